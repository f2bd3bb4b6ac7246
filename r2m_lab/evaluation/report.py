"""The run report: what one evaluation run found, as one typed object that the writers render.

Evaluation builds it (:meth:`ModelResult.from_scores` per model, then :class:`RunReport`); the writers in
:mod:`r2m_lab.evaluation.writers` each turn it into one thing (metrics.json, score CSVs, tables, plots, logger
entries). :meth:`RunReport.to_json` is the ``metrics.json`` payload: ``benchmark``, ``protocols``, ``models`` (one
entry per row, see :meth:`ModelResult.to_json`), ``row_order`` and ``protocol_order`` (the display orders: metrics.json
is written key-sorted), then the caller's ``extra`` entries in their order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from r2m_lab.data.sources import FrameSet
from r2m_lab.evaluation.metrics import evaluate_scores, fit_threshold

VALIDATION = "validation"  # the set thresholds are fitted on; every other set is a test set
THRESHOLD_FITTED_ON = "validation (EER point)"
# metrics.json keys the report itself writes; the file is key-sorted, so the display orders are lists of their own
RESERVED = ("benchmark", "protocols", "models", "row_order", "protocol_order")


@dataclass(frozen=True)
class ScoredSet:
    """The ground truth of one evaluated set: per frame its key, video id and label (0 real, 1 fake), (F,) each."""

    name: str
    keys: np.ndarray = field(repr=False)
    video_ids: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, name: str, frames: FrameSet) -> ScoredSet:
        """The labels of ``frames`` without its images (a report outlives the pixels it was scored on)."""
        return cls(name, np.asarray(frames.keys), np.asarray(frames.video_ids), np.asarray(frames.labels))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ModelResult:
    """One row of the report: a detector (or the output ensemble) scored on validation and on every test set.

    ``validation`` and each ``test[set]`` are ``{"frame": metrics, "video": metrics}`` (see
    :func:`~r2m_lab.evaluation.metrics.evaluate_scores`) at ``threshold``, the EER point fitted on validation.
    ``scores`` holds every set's (F,) P(fake) in the set's frame order, validation included; it feeds the ROC curves
    and stays out of metrics.json (the score CSVs hold it).
    """

    source: str
    threshold: float
    validation: dict[str, dict[str, float]]
    test: dict[str, dict[str, dict[str, float]]]
    scores: dict[str, np.ndarray] = field(repr=False)

    @classmethod
    def from_scores(
        cls, source: str, scores: Mapping[str, np.ndarray], sets: Mapping[str, ScoredSet], test_sets: Sequence[str]
    ) -> ModelResult:
        """Fit the threshold on ``scores["validation"]`` and measure every test set at it (in ``test_sets`` order)."""
        missing = [n for n in (VALIDATION, *test_sets) if n not in scores or n not in sets]
        if missing:
            raise ValueError(f"{source}: no scores or no labels for set(s) {missing}")
        for name in (VALIDATION, *test_sets):
            if len(scores[name]) != len(sets[name]):
                raise ValueError(f"{source}: {len(scores[name])} scores for the {len(sets[name])} frames of {name}")
        val = sets[VALIDATION]
        threshold = fit_threshold(scores[VALIDATION], val.labels, mode="eer")
        return cls(
            source=source,
            threshold=threshold,
            validation=evaluate_scores(scores[VALIDATION], val.labels, val.video_ids, threshold),
            test={
                n: evaluate_scores(scores[n], sets[n].labels, sets[n].video_ids, threshold)
                for n in dict.fromkeys(test_sets)
            },
            scores=dict(scores),
        )

    def to_json(self) -> dict[str, Any]:
        """The model's entry under ``models`` in metrics.json."""
        return {
            "checkpoint": self.source,
            "threshold": self.threshold,
            "threshold_fitted_on": THRESHOLD_FITTED_ON,
            "validation": self.validation,
            "test": self.test,
        }


@dataclass(frozen=True)
class TaskVectorCosines:
    """cos(τᵢ, τⱼ) between the specialists' task vectors: ``matrix[i][j]`` for ``names[i]``, ``names[j]``."""

    names: list[str]
    matrix: list[list[float]]

    def __post_init__(self) -> None:
        if np.shape(self.matrix) != (len(self.names), len(self.names)):
            raise ValueError(f"task-vector cosines: a {np.shape(self.matrix)} matrix for {len(self.names)} names")


@dataclass(frozen=True)
class RunReport:
    """Every model of one run on every set of one benchmark, and what the run adds beside it.

    ``protocols`` maps a protocol to its test sets (``<protocol>/<key>``); ``sets`` holds the ground truth of
    ``validation`` and of every test set; ``models`` the rows in display order. ``title`` heads the Markdown;
    ``extra`` goes into metrics.json after the evaluation (merge card, task-vector cosines, timings, config...).
    """

    benchmark: str
    protocols: dict[str, list[str]]
    sets: dict[str, ScoredSet] = field(repr=False)
    models: dict[str, ModelResult]
    title: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [n for n in (VALIDATION, *self.test_sets) if n not in self.sets]
        if unknown:
            raise ValueError(f"report on {self.benchmark}: no labels for set(s) {unknown}")
        clash = sorted(set(self.extra) & set(RESERVED))
        if clash:
            raise ValueError(f"extra entries {clash} would overwrite the report's own metrics.json keys")

    @property
    def test_sets(self) -> list[str]:
        """Every test set, protocol after protocol (a set listed under two protocols appears twice, as in the plots)."""
        return [name for names in self.protocols.values() for name in names]

    def test_results(self) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """``{model: {test set: {"frame": metrics, "video": metrics}}}``: what the table builders read."""
        return {label: result.test for label, result in self.models.items()}

    def auc_matrix(self, level: str) -> np.ndarray:
        """(models, test sets) AUC at ``level`` ("frame" or "video"), rows and columns as :attr:`models` and
        :attr:`test_sets`."""
        return np.array([[r.test[n][level]["auc"] for n in self.test_sets] for r in self.models.values()])

    @property
    def task_vector_cosines(self) -> TaskVectorCosines | None:
        """The specialists' task-vector cosines when the run recorded them (``extra["task_vector_cosines"]``)."""
        tv = self.extra.get("task_vector_cosines")
        return None if tv is None else TaskVectorCosines(list(tv["names"]), [list(row) for row in tv["matrix"]])

    @property
    def timings_seconds(self) -> dict[str, float] | None:
        """Wall-clock seconds per step when the run recorded them (``extra["timings_seconds"]``)."""
        timings = self.extra.get("timings_seconds")
        return None if timings is None else {str(k): float(v) for k, v in timings.items()}

    def reordered(self, order: Iterable[str]) -> RunReport:
        """The same report with its rows in ``order``; names without a row are skipped, a row left out is refused."""
        order = [m for m in dict.fromkeys(order) if m in self.models]
        left_out = [m for m in self.models if m not in order]
        if left_out:
            raise ValueError(f"reordering the report would drop the row(s) {left_out}; list them in the order")
        return dataclasses.replace(self, models={m: self.models[m] for m in order})

    def with_context(self, title: str | None = None, extra: Mapping[str, Any] | None = None) -> RunReport:
        """The same report with a title and ``extra`` entries added after the existing ones (a key given again is
        replaced)."""
        return dataclasses.replace(
            self, title=self.title if title is None else title, extra={**self.extra, **dict(extra or {})}
        )

    def to_json(self) -> dict[str, Any]:
        """The metrics.json payload (plain JSON types; the per-frame scores are not in it)."""
        return {
            "benchmark": self.benchmark,
            "protocols": {p: list(names) for p, names in self.protocols.items()},
            "models": {label: result.to_json() for label, result in self.models.items()},
            "row_order": list(self.models),
            "protocol_order": list(self.protocols),
            **self.extra,
        }
