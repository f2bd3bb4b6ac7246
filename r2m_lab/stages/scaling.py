"""stage=scaling: merge 2, 3, … K specialists; AUC on the merged, left-out and unseen families, merge time and memory
against N.

For every size N of ``stage.sizes`` (default: 2..K, K = the benchmark's families) every family subset of that size is
merged, unless the size has more than ``stage.max_subsets`` subsets: then the subsets are the cyclic windows of the
benchmark's family order, ``(f[i], f[i+1], …, f[i+N-1])`` (indices mod K) for i = 0, 1, …, min(K, max_subsets) - 1,
a fixed, deterministic choice in which every family is merged equally often (:func:`family_subsets`). For each
subset every merger of ``stage.mergers`` (and every row of ``stage.variants``), planned exactly as stage=pipeline
plans them, chooses its scalar on the validation split of that subset's families only
(:func:`~r2m_lab.stages.families.restrict_benchmark`) and is merged; specialists are trained once and reused.

All rows (the specialists, then each subset's merges, labelled ``<row>@<family+family…>``) are scored in one
evaluation on the full benchmark's test sets, so each frame is scored once per model. Each row's ``groups``
(see :func:`row_groups`) names the sets the table builder averages: ``merged`` (in-distribution sets of the
row's families), ``left_out`` (those of the other families), ``unseen`` (the benchmark's unseen protocol), ``cross``
(the row's families in the cross-domain / cross-dataset protocols). ``peak_memory_bytes`` is measured, with
``stage.measure_memory``, by re-running the first subset's winning merge config of each size in a fresh interpreter
(:func:`r2m_lab.bench._measure`: in-process peak RSS is meaningless once freed heap is kept for reuse).
``scaling.md`` in the run folder holds the per-merger summary against N.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from r2m_lab.atomic import write_text_atomic
from r2m_lab.evaluation.report import RunReport
from r2m_lab.stages.artifacts import base_path, merged_path, output_dir, specialist_path
from r2m_lab.stages.base_model import ensure_base
from r2m_lab.stages.config_nodes import plain
from r2m_lab.stages.evaluate import evaluate_models, write_report
from r2m_lab.stages.families import family_keys, restrict_benchmark
from r2m_lab.stages.finetune import train_detector
from r2m_lab.stages.merge import SELECTION_SPLIT, merge_specialists, open_specialists, select_and_merge
from r2m_lab.stages.models import resolve_device
from r2m_lab.stages.pipeline import PipelinePlan, check_benchmark_data, plan_pipeline
from r2m_lab.stages.rows import merger_row, specialist_row, theta0_entry
from r2m_lab.stages.timing import stopwatch

log = logging.getLogger(__name__)

IN_DISTRIBUTION = "in_distribution"  # the protocol holding one test set per family, keyed like benchmark.specialists
UNSEEN = "unseen"  # the protocol of forgery families no specialist saw
TOP_LEVEL_KNOBS = ("rank_ratio",)  # merger knobs whose YAML value is the top-level alias ${rank_ratio}
LEVEL = "frame"  # the summaries' AUC level (the CSVs and metrics.json hold both levels)


# ------------------------------------------------------------------------------------------------ what runs
def subset_sizes(value: Any, n_families: int) -> list[int]:
    """``stage.sizes``: ``all`` (2..K) or a list of sizes, each in 2..K, ascending, duplicates refused."""
    if value is None or value == "all":
        return list(range(2, n_families + 1))
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"stage.sizes must be `all` or a non-empty list of sizes in 2..{n_families}, got {value!r}")
    sizes = [int(v) for v in value]
    bad = sorted({s for s in sizes if not 2 <= s <= n_families})
    if bad:
        raise ValueError(f"stage.sizes has {bad}, outside 2..{n_families} (the benchmark has {n_families} families)")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"stage.sizes lists a size twice: {sizes}")
    return sorted(sizes)


def family_subsets(families: Sequence[str], size: int, max_subsets: int) -> tuple[list[list[str]], str]:
    """The subsets of ``size`` families that are merged, each in the benchmark's order, and how they were chosen.

    Every subset (``itertools.combinations`` order) when there are at most ``max_subsets``; otherwise the first
    min(K, max_subsets) cyclic windows of the family order, which are distinct for size < K.
    """
    k = len(families)
    if max_subsets < 1:
        raise ValueError(f"stage.max_subsets must be at least 1, got {max_subsets}")
    if math.comb(k, size) <= max_subsets:
        return [list(c) for c in itertools.combinations(families, size)], "all"
    windows = []
    for start in range(min(k, max_subsets)):
        members = {families[(start + j) % k] for j in range(size)}
        windows.append([f for f in families if f in members])
    return windows, f"cyclic windows (first {len(windows)} of the {k} windows; {math.comb(k, size)} subsets)"


def row_groups(
    cfg: DictConfig, families: Sequence[str], inside: str = "merged", outside: str = "left_out"
) -> dict[str, list[str]]:
    """``{group: [test sets]}`` of a row built from ``families``, over the full benchmark's ``<protocol>/<key>`` sets.

    ``inside`` / ``outside``: the in-distribution sets of ``families`` / of the other families; ``unseen``: every set of
    the unseen protocol; ``cross`` / ``cross_<outside>``: sets of the other protocols (cross-domain, cross-dataset)
    keyed by one of ``families`` / by another family; a set of another protocol keyed by no family (FF++'s
    cross-dataset sets) goes to a group named after its protocol, for every row alike. Empty groups are left out.
    """
    keys = family_keys(cfg)
    in_dist = cfg.benchmark.protocols.get(IN_DISTRIBUTION)
    missing = [k for k in keys if in_dist is None or k not in in_dist]
    if missing:
        raise ValueError(
            f"benchmark {cfg.benchmark.name} has no {IN_DISTRIBUTION} test set for families {missing}: the scaling "
            f"and expansion tables need protocols.{IN_DISTRIBUTION}.<family> for every family of benchmark.specialists"
        )
    groups: dict[str, list[str]] = {inside: [], outside: [], UNSEEN: [], "cross": [], f"cross_{outside}": []}
    for protocol, sets in cfg.benchmark.protocols.items():
        for key in sets:
            name = f"{protocol}/{key}"
            if protocol == UNSEEN:
                groups[UNSEEN].append(name)
            elif key not in keys:
                groups.setdefault(str(protocol), []).append(name)
            elif protocol == IN_DISTRIBUTION:
                groups[inside if key in families else outside].append(name)
            else:
                groups["cross" if key in families else f"cross_{outside}"].append(name)
    return {g: names for g, names in groups.items() if names}


def group_means(report: RunReport, label: str, groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Mean ``LEVEL`` AUC of ``label``'s row over each group's sets."""
    test = report.models[label].test
    return {g: float(np.mean([test[n][LEVEL]["auc"] for n in names])) for g, names in groups.items()}


def hydra_value(value: Any) -> str:
    """A knob's value as a Hydra command-line override value (``null``, ``true``, ``0.1``, ``[1,2]``, ``'a b'``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if text.replace("_", "").replace("-", "").replace(".", "").isalnum() else repr(text)


def merger_overrides(hparams: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides that compose ``merger=<name>`` at exactly ``hparams`` (the top-level alias for
    ``rank_ratio``, which r2m's and cart's YAML read from the root)."""
    return [
        f"{k}={hydra_value(v)}" if k in TOP_LEVEL_KNOBS else f"merger.{k}={hydra_value(v)}" for k, v in hparams.items()
    ]


def measure_peak_memory(cfg: DictConfig, card: Mapping[str, Any]) -> dict[str, Any]:
    """Re-run the merge of ``card`` (its merger at its hparams, on the specialists of ``cfg``'s benchmark) in a fresh
    interpreter; return its wall-clock and peak RSS (VmHWM) in bytes."""
    from r2m_lab.bench import _measure

    overrides = merger_overrides(card["hparams"])
    paths = [specialist_path(cfg, str(d.name)) for d in cfg.benchmark.specialists.values()]
    job = _measure(str(card["merger"]), base_path(cfg), paths, str(resolve_device(cfg)), overrides)
    return {
        "peak_memory_bytes": int(round(job["peak_rss_gb"] * 1e9)),
        "fresh_merge_seconds": round(float(job["merge_s"]), 3),
        "overrides": overrides,
    }


def plan_subsets(cfg: DictConfig, subsets: Sequence[Sequence[str]]) -> dict[tuple[str, ...], PipelinePlan]:
    """The pipeline's plan (mergers, variants, grids) on each subset's restricted benchmark: every knob is checked with
    N = the subset's size before anything is trained."""
    return {tuple(s): plan_pipeline(restrict_benchmark(cfg, s)) for s in subsets}


def merge_subset(
    sub: DictConfig, plan: PipelinePlan, split: str, reuse: bool, tag: str
) -> dict[str, tuple[dict[str, Any], float]]:
    """Every row of ``plan`` on ``sub``'s specialists, each choosing its scalar on ``sub``'s validation split; returns
    {row label: (merge card, wall-clock seconds of this call)}."""
    out = {}
    for label, merger_cfg in plan.mergers.items():
        start = time.perf_counter()
        if label in plan.grids:
            card = select_and_merge(sub, merger_cfg, plan.grids[label], split, reuse, label=f"{label}@{tag}")
        else:
            card = merge_specialists(sub, merger_cfg, reuse)
        out[label] = (card, time.perf_counter() - start)
    return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def fmt_cell(value: float | None, digits: int = 3) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------------ the stage
def scaling(cfg: DictConfig) -> dict[str, Any]:
    """Run the scaling table (see the module docstring); return the metrics.json payload."""
    reuse = bool(cfg.stage.reuse)
    split = str(cfg.stage.get("select_split", SELECTION_SPLIT))
    group = output_dir(cfg).name
    timings: dict[str, float] = {}
    timed = stopwatch(timings)

    keys = family_keys(cfg)
    sizes = subset_sizes(plain(cfg.stage.sizes), len(keys))
    max_subsets = int(cfg.stage.max_subsets)
    subsets: dict[int, list[list[str]]] = {}
    choice: dict[int, str] = {}
    for size in sizes:
        subsets[size], choice[size] = family_subsets(keys, size, max_subsets)
    flat = [s for size in sizes for s in subsets[size]]
    plans = plan_subsets(cfg, flat)
    row_groups(cfg, keys)  # a benchmark without per-family in-distribution sets is refused before training
    measure = bool(cfg.stage.measure_memory)
    check_benchmark_data(cfg, plans[tuple(flat[-1])])
    log.info("scaling: %d subsets of sizes %s (%s)", len(flat), sizes, choice)

    timed("base", ensure_base, cfg)
    for key, data_cfg in cfg.benchmark.specialists.items():
        timed(f"finetune/{key}", train_detector, cfg, data_cfg, "specialist", reuse, group)
    base, _ = open_specialists(cfg)  # every specialist descends from this θ₀, or the run stops here

    checkpoints: dict[str, Path] = {}
    rows: dict[str, dict[str, Any]] = {}
    for key in keys:
        label = f"specialist:{key}"
        checkpoints[label] = specialist_path(cfg, str(cfg.benchmark.specialists[key].name))
        rows[label] = {**specialist_row(key), "n": 1, "groups": row_groups(cfg, [key])}
    merges: dict[str, dict[str, Any]] = {}
    memory: dict[str, dict[str, Any]] = {}
    for subset in tqdm(flat, desc="scaling subsets", unit="subset"):
        tag = "+".join(subset)
        sub = restrict_benchmark(cfg, subset)
        plan = plans[tuple(subset)]
        cards = timed(f"merge/{tag}", merge_subset, sub, plan, split, reuse, tag)
        first_of_size = subset == subsets[len(subset)][0]
        for name, (card, _) in cards.items():
            label = f"{name}@{tag}"
            info: dict[str, Any] = {"n": len(subset), "groups": row_groups(cfg, subset)}
            rows[label] = merger_row(card, subset, variant=name if name in plan.variants else None, **info)
            rows[label]["row"] = name
            checkpoints[label] = Path(card.get("checkpoint_path", merged_path(sub, plan.mergers[name])))
            merges[label] = {k: card[k] for k in ("hparams", "merge_seconds", "selection") if k in card}
            if measure and first_of_size:
                memory[label] = timed(f"memory/{label}", measure_peak_memory, sub, card)
                rows[label]["peak_memory_bytes"] = memory[label]["peak_memory_bytes"]
                log.info("%s: peak RSS %.1f MB in a fresh interpreter", label, memory[label]["peak_memory_bytes"] / 1e6)

    report = timed("evaluate", evaluate_models, cfg, checkpoints)  # the full benchmark's sets, each model once
    report = report.reordered(checkpoints)
    summary = scaling_markdown(report, rows)
    extra = {
        "stage": "scaling",
        "backbone": str(cfg.backbone.name),
        "seed": int(cfg.seed),
        "theta0": theta0_entry(base),
        "families": keys,
        "sizes": sizes,
        "subsets": {str(size): subsets[size] for size in sizes},
        "subset_choice": {str(size): choice[size] for size in sizes},
        "rows": {label: rows[label] for label in report.models},
        "merges": merges,
        "memory": memory,
        "timings_seconds": timings,
        "config": plain(cfg),
    }
    metrics = write_report(cfg, report, title=f"{cfg.benchmark.name}: merging 2..K specialists", extra=extra)
    write_text_atomic(output_dir(cfg) / "scaling.md", summary)
    print(summary)  # the run's final word beside the table write_report printed
    log.info("Timings (s): %s", timings)
    return metrics


def scaling_markdown(report: RunReport, rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown table per merger row: N → mean AUC on merged / left-out / unseen sets (averaged over the
    subsets of that size), mean merge seconds and the measured peak MB. The specialists are the N = 1 line."""
    lines = [
        "# Scaling: merging N specialists",
        "",
        f"{LEVEL.capitalize()}-level AUC, each row's group mean averaged over the subsets of size N; merge s from the "
        "merge cards (the winning grid point); peak MB measured on the first subset of each size (empty: not "
        "measured).",
    ]
    by_row: dict[str, dict[int, list[str]]] = {}
    for label, row in rows.items():
        name = "specialist" if row["kind"] == "specialist" else str(row["row"])
        by_row.setdefault(name, {}).setdefault(int(row["n"]), []).append(label)
    for name, per_n in by_row.items():
        lines += ["", f"## {name}", "", "| N | subsets | merged | left-out | unseen | merge s | peak MB |"]
        lines.append("|---:|---:|---:|---:|---:|---:|---:|")
        for n in sorted(per_n):
            labels = per_n[n]
            means = [group_means(report, label, rows[label]["groups"]) for label in labels]
            cells = [_mean([m[g] for m in means if g in m]) for g in ("merged", "left_out", UNSEEN)]
            seconds = _mean(
                [rows[label]["merge_seconds"] for label in labels if rows[label]["merge_seconds"] is not None]
            )
            peaks = [rows[label]["peak_memory_bytes"] for label in labels if rows[label]["peak_memory_bytes"]]
            row = [str(n), str(len(labels)), *(fmt_cell(c) for c in cells), fmt_cell(seconds, 2)]
            lines.append("| " + " | ".join([*row, fmt_cell(peaks[0] / 1e6 if peaks else None, 0)]) + " |")
    return "\n".join(lines) + "\n"
