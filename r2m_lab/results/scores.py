"""The per-frame and per-video score CSVs of a table's runs, aligned on one video order per test set.

Files: ``<run>/scores/<safe(row)>/<safe(set)>.csv`` (``frame, video_id, label, score``) and ``.videos.csv``
(``video_id, label, score``). Every (seed, row) of a set must hold the same videos: the bootstrap resamples one set
of videos for all of them (see :mod:`r2m_lab.results.stats`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from r2m_lab.evaluation.writers import safe_name
from r2m_lab.results.grouping import TableRuns


@dataclass(frozen=True)
class LevelScores:
    """Scores of one (seed, row, set) at one level: ``unit`` indexes the set's canonical video order."""

    scores: np.ndarray  # (n,) float64
    labels: np.ndarray  # (n,) int64 (1 = fake)
    unit: np.ndarray  # (n,) video index of each score


def score_file(run_folder: Path, row: str, test_set: str, level: str) -> Path:
    base = run_folder / "scores" / safe_name(row) / safe_name(test_set)
    return base.with_name(base.name + (".csv" if level == "frame" else ".videos.csv"))


def _read(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"score file {path} is missing (every row and test set of a run writes one)")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns: dict[str, list[str]] = {c: [] for c in reader.fieldnames or []}
        for record in reader:
            for c in columns:
                columns[c].append(record[c])
    needed = {"video_id", "label", "score"}
    if not needed <= set(columns):
        raise ValueError(f"{path} lacks the columns {sorted(needed - set(columns))}")
    return columns


class ScoreStore:
    """Loads score files of one table on demand and keeps each set's video order (that of the first file read)."""

    def __init__(self, table: TableRuns) -> None:
        self.table = table
        self.videos: dict[str, list[str]] = {}  # set → canonical video ids
        self._index: dict[str, dict[str, int]] = {}
        self._first: dict[str, Path] = {}
        self._cache: dict[tuple[int, str, str, str], LevelScores] = {}

    def n_videos(self, test_set: str, seed: int, row: str) -> int:
        """The set's video count, reading one videos file of (seed, row) if none was read yet."""
        if test_set not in self.videos:
            self.get(seed, row, test_set, "video")
        return len(self.videos[test_set])

    def get(self, seed: int, row: str, test_set: str, level: str) -> LevelScores:
        key = (seed, row, test_set, level)
        if key not in self._cache:
            path = score_file(self.table.runs[seed].folder, row, test_set, level)
            columns = _read(path)
            ids = columns["video_id"]
            if test_set not in self.videos:
                order = list(dict.fromkeys(ids))
                self.videos[test_set] = order
                self._index[test_set] = {v: i for i, v in enumerate(order)}
                self._first[test_set] = path
            index = self._index[test_set]
            if set(ids) != set(index):
                extra, lacking = sorted(set(ids) - set(index))[:5], sorted(set(index) - set(ids))[:5]
                raise ValueError(
                    f"test set {test_set!r} holds different videos in {path} and {self._first[test_set]} (e.g. only "
                    f"in the first: {extra}, only in the second: {lacking}); the paired bootstrap needs the same "
                    "test videos for every seed and row: these runs did not evaluate the same test set"
                )
            self._cache[key] = LevelScores(
                scores=np.asarray(columns["score"], dtype=np.float64),
                labels=np.asarray(columns["label"], dtype=np.float64).astype(np.int64),
                unit=np.asarray([index[v] for v in ids], dtype=np.int64),
            )
        return self._cache[key]
