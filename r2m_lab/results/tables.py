"""One table of the paper from the runs of its seeds: cells (mean ± std over seeds, or what is missing), the best
mark per column, and the paired bootstrap differences of every merger against ``r2m`` and ``average``.

Columns are the test sets, then one mean per protocol (rows without ``groups``: pipeline) and one mean per group
(rows with ``groups``: scaling, expansion, heads; each row averages its own sets of that group). A cell pools the
table's seeds only when every expected seed has the value; otherwise it names the missing seeds and holds no mean.

Best rule: in each column the row with the highest mean is marked best only when the bootstrap interval of its
difference to the runner-up excludes zero; otherwise both are marked as a tie (see :mod:`r2m_lab.results.stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from r2m_lab.results.grouping import TableRuns
from r2m_lab.results.scores import ScoreStore, score_file
from r2m_lab.results.stats import Draws, Interval, SortedScores, draw, interval, pool_seeds

LEVELS = ("frame", "video")
EXTRA_METRICS = ("ap", "eer", "tpr_at_fpr_1", "tpr_at_fpr_5", "acc", "balanced_acc")
REFERENCES = ("r2m", "average")  # every merger row is compared with these rows when the table has them
AUC_TOLERANCE = 1e-4  # recomputed AUC from the score files vs metrics.json (float32 scores, float64 here)


@dataclass(frozen=True)
class Column:
    """A table column: one test set (``kind='set'``), or a protocol or group mean (``key`` = its name)."""

    name: str
    kind: str
    key: str


@dataclass
class Cell:
    """One (row, column) at one level. ``values`` per seed (table seed order) when complete."""

    applicable: bool
    values: list[float] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)  # AP, EER, TPR@FPR...: means over seeds
    mark: str = ""  # "" | "best" | "tie"

    @property
    def complete(self) -> bool:
        return self.applicable and not self.missing and bool(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.complete else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.complete and len(self.values) > 1 else math.nan

    def text(self, digits: int = 3) -> str:
        """``0.812 ± 0.010`` (one seed: ``0.812``), ``missing: seed 2``, ``n/a`` (undefined) or empty."""
        if not self.applicable:
            return ""
        if self.missing:
            return f"missing: seed{'s' if len(self.missing) > 1 else ''} {', '.join(map(str, self.missing))}"
        if not math.isfinite(self.mean):
            return "n/a"
        if len(self.values) == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def _row_sets(info: dict[str, Any], column: Column, protocols: dict[str, list[str]], sets: list[str]) -> list[str]:
    """The test sets a row averages in ``column`` (empty: the column does not apply to the row)."""
    groups = info.get("groups") or {}
    if column.kind == "set":
        return [column.key] if column.key in sets else []
    if column.kind == "protocol":
        return [] if groups else list(protocols.get(column.key, []))
    return list(groups.get(column.key, []))


class Bootstrapper:
    """Replicates of a table's AUCs on shared draws (so every difference is paired); memoised per (seed, row, set)."""

    def __init__(self, table: TableRuns, store: ScoreStore, sets: list[str], replicates: int, seed: int) -> None:
        self.table, self.store, self.sets = table, store, sets
        self.replicates, self.seed = replicates, seed
        self._draws: Draws | None = None
        self._memo: dict[tuple[int, str, str, str], tuple[float, np.ndarray]] = {}

    @property
    def draws(self) -> Draws:
        if self._draws is None:
            first = self.table.first
            n_videos = {}
            for s in self.sets:
                row = next((r for r in first.metrics["models"] if s in first.metrics["models"][r]["test"]), None)
                if row is None:
                    raise ValueError(f"no row of {first.folder} was evaluated on {s!r}")
                n_videos[s] = self.store.n_videos(s, self.table.seeds[0], row)
            self._draws = draw(len(self.table.seeds), n_videos, self.replicates, self.seed)
        return self._draws

    def per_seed(self, seed: int, row: str, test_set: str, level: str) -> tuple[float, np.ndarray]:
        """(observed AUC, (B,) replicate AUCs) of one row on one set for one seed."""
        key = (seed, row, test_set, level)
        if key not in self._memo:
            scores = self.store.get(seed, row, test_set, level)
            sorted_scores = SortedScores(scores.scores, scores.labels, scores.unit)
            weights = self.draws.videos[test_set]  # (B, V) video counts
            observed = float(sorted_scores.auc(np.ones((1, weights.shape[1])))[0])
            reported = float(self.table.runs[seed].metrics["models"][row]["test"][test_set][level]["auc"])
            if not (math.isnan(observed) and math.isnan(reported)) and not abs(observed - reported) <= AUC_TOLERANCE:
                path = score_file(self.table.runs[seed].folder, row, test_set, level)
                raise ValueError(
                    f"{path} gives AUC {observed:.6f} but metrics.json reports {reported:.6f} for row {row!r} on "
                    f"{test_set!r} ({level}): the score files do not belong to this metrics.json"
                )
            self._memo[key] = (observed, sorted_scores.auc(weights))
        return self._memo[key]

    def column(self, row: str, sets: list[str], level: str) -> tuple[float, np.ndarray]:
        """(mean over seeds of the mean over ``sets``, (B,) its replicates: seeds drawn, then videos)."""
        observed, replicates = [], []
        for seed in self.table.seeds:
            per_set = [self.per_seed(seed, row, s, level) for s in sets]
            observed.append(np.mean([o for o, _ in per_set]))
            replicates.append(np.mean([r for _, r in per_set], axis=0))
        return float(np.mean(observed)), pool_seeds(replicates, self.draws.seeds)

    def difference(
        self, a: str, b: str, sets_a: list[str], sets_b: list[str], level: str, confidence: float
    ) -> Interval:
        """Paired interval of (row ``a`` on ``sets_a``) − (row ``b`` on ``sets_b``) on the same replicates."""
        point_a, rep_a = self.column(a, sets_a, level)
        point_b, rep_b = self.column(b, sets_b, level)
        return interval(point_a - point_b, rep_a - rep_b, confidence)


@dataclass
class Table:
    """A built table: columns, rows (display order), their infos, cells, best marks and pairs per level."""

    runs: TableRuns
    columns: list[Column]
    rows: list[str]
    info: dict[str, dict[str, Any]]
    protocols: dict[str, list[str]]
    cells: dict[str, dict[tuple[str, str], Cell]]
    best: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    pairs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.runs.name

    def row_sets(self, row: str, column: Column) -> list[str]:
        return _row_sets(self.info[row], column, self.protocols, [c.key for c in self.columns if c.kind == "set"])


def _layout(table: TableRuns) -> tuple[list[str], dict[str, dict[str, Any]], dict[str, list[str]], list[Column]]:
    """Rows (first seed's order, then any other seed's extras), their infos, protocols and columns."""
    rows: dict[str, dict[str, Any]] = {}
    protocols: dict[str, list[str]] = {}
    for seed in table.seeds:
        metrics = table.runs[seed].metrics
        # metrics.json is key-sorted: the display orders are its row_order and protocol_order lists
        for label in metrics.get("row_order") or metrics["rows"]:
            if label in metrics["rows"]:
                rows.setdefault(label, metrics["rows"][label])
        for label, info in metrics["rows"].items():
            rows.setdefault(label, info)
        for protocol in metrics.get("protocol_order") or metrics["protocols"]:
            known = protocols.setdefault(protocol, [])
            known += [n for n in metrics["protocols"][protocol] if n not in known]
    sets = [n for names in protocols.values() for n in names]
    columns = [Column(s, "set", s) for s in sets]
    if any(not info.get("groups") for info in rows.values()):
        columns += [Column(f"{p} mean", "protocol", p) for p in protocols]
    group_names = list(dict.fromkeys(g for info in rows.values() for g in (info.get("groups") or {})))
    columns += [Column(f"{g} mean", "group", g) for g in group_names]
    return list(rows), rows, protocols, columns


def _cell(table: TableRuns, row: str, sets: list[str], level: str) -> Cell:
    if not sets:
        return Cell(applicable=False)
    cell = Cell(applicable=True, missing=list(table.missing_seeds))
    per_metric: dict[str, list[float]] = {m: [] for m in EXTRA_METRICS}
    for seed in table.seeds:
        tests = table.runs[seed].metrics["models"].get(row, {}).get("test", {})
        if row not in table.runs[seed].metrics["rows"] or any(s not in tests for s in sets):
            cell.missing.append(seed)
            continue
        cell.values.append(float(np.mean([tests[s][level]["auc"] for s in sets])))
        for m in EXTRA_METRICS:
            per_metric[m].append(float(np.mean([tests[s][level].get(m, math.nan) for s in sets])))
    cell.missing = sorted(set(cell.missing))
    if not cell.missing:
        cell.extra = {m: float(np.mean(v)) for m, v in per_metric.items()}
    return cell


def build_table(table: TableRuns, replicates: int, seed: int, confidence: float) -> Table:
    """Cells, best marks and pairs of one table at both levels (see the module docstring for the rules)."""
    rows, info, protocols, columns = _layout(table)
    sets = [c.key for c in columns if c.kind == "set"]
    built = Table(table, columns, rows, info, protocols, cells={})
    for level in LEVELS:
        built.cells[level] = {(r, c.name): _cell(table, r, built.row_sets(r, c), level) for r in rows for c in columns}
    boot = Bootstrapper(table, ScoreStore(table), sets, replicates, seed)
    for level in LEVELS:
        built.best[level] = _mark_best(built, boot, level, confidence)
        built.pairs[level] = _pairs(built, boot, level, confidence)
    return built


def _mark_best(table: Table, boot: Bootstrapper, level: str, confidence: float) -> list[dict[str, Any]]:
    """Mark each column's best cell (its interval against the runner-up excludes zero) or the tie of the two."""
    decisions = []
    for column in table.columns:
        cells = table.cells[level]
        ranked = sorted(
            (r for r in table.rows if cells[(r, column.name)].complete and math.isfinite(cells[(r, column.name)].mean)),
            key=lambda r: -cells[(r, column.name)].mean,
        )
        if len(ranked) < 2:
            continue
        best, second = ranked[0], ranked[1]
        diff = boot.difference(
            best, second, table.row_sets(best, column), table.row_sets(second, column), level, confidence
        )
        mark = "best" if diff.lo > 0 else "tie"
        cells[(best, column.name)].mark = mark
        if mark == "tie":
            cells[(second, column.name)].mark = "tie"
        decisions.append(
            {"column": column.name, "best": best, "runner_up": second, "mark": mark, **_interval_json(diff)}
        )
    return decisions


def _interval_json(diff: Interval) -> dict[str, Any]:
    return {
        "mean_diff": diff.mean,
        "lo": diff.lo,
        "hi": diff.hi,
        "excludes_zero": diff.excludes_zero,
        "n_undefined": diff.n_undefined,
    }


# Row facts that must agree between a row and its reference when the reference is found by merger name.
_SAME = ("families", "step", "head")


def reference_row(table: Table, row: str, name: str) -> str | None:
    """The row ``row`` is compared with for reference ``name`` (``r2m`` / ``average``): the row labelled ``name``;
    else (scaling, expansion, heads: labels carry the subset or step) the one row of merger ``name``, no variant,
    built from the same families at the same step (and head)."""
    if name in table.info:
        return name
    mine = table.info[row]
    found = [
        r
        for r, info in table.info.items()
        if info.get("merger") == name
        and not info.get("variant")
        and all(_same(info.get(k), mine.get(k)) for k in _SAME)
    ]
    return found[0] if len(found) == 1 else None


def _same(a: Any, b: Any) -> bool:
    return sorted(a) == sorted(b) if isinstance(a, list) and isinstance(b, list) else a == b


def _pairs(table: Table, boot: Bootstrapper, level: str, confidence: float) -> list[dict[str, Any]]:
    """Every merger row against each of its reference rows (:func:`reference_row`): per set and per protocol/group
    mean of the merger (the reference is scored on the merger's sets of that group)."""
    out = []
    cells = table.cells[level]
    for row in table.rows:
        if table.info[row].get("kind") != "merger":
            continue
        for name in REFERENCES:
            reference = reference_row(table, row, name)
            if reference is None or reference == row:
                continue
            for column in table.columns:
                sets = table.row_sets(row, column)
                if not sets:
                    continue
                record = {"row": row, "reference": reference, "column": column.name, "sets": sets}
                ref_sets_known = all(
                    s in table.runs.runs[seed].metrics["models"].get(reference, {}).get("test", {})
                    for seed in table.runs.seeds
                    for s in sets
                )
                missing = sorted(set(cells[(row, column.name)].missing) | set(table.runs.missing_seeds))
                if missing or not ref_sets_known:
                    note = f"missing: seeds {', '.join(map(str, missing))}" if missing else f"{reference} lacks {sets}"
                    out.append({**record, "note": note})
                    continue
                diff = boot.difference(row, reference, sets, sets, level, confidence)
                out.append({**record, **_interval_json(diff), "note": ""})
    return out
