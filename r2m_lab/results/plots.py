"""Figures of built tables: the mean-AUC heatmap of every table, the scaling curve (stage=scaling) and the expansion
curve (stage=expansion). Headless (``Figure`` + Agg canvas, as :mod:`r2m_lab.evaluation.plots`), written atomically.

A row's *method* (one line of a curve) is its merger conf name, with its variant in parentheses when it has one;
a row that is not a merger (joint, ensemble) is its label up to the first ``@`` (``joint@3`` → ``joint``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from r2m_lab.atomic import atomic_path
from r2m_lab.evaluation.plots import plot_heatmap
from r2m_lab.results.tables import LEVELS, Column, Table


def _save(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to the PNG ``path`` atomically, then drop its artists."""
    FigureCanvasAgg(fig)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    finally:
        fig.clear()
    return path


def method_name(label: str, info: dict[str, Any]) -> str:
    if info.get("kind") == "merger" and info.get("merger"):
        return f"{info['merger']} ({info['variant']})" if info.get("variant") else str(info["merger"])
    return label.split("@", 1)[0]


def heatmaps(table: Table, out: Path) -> list[Path]:
    """``plots/<table>_auc_<level>.png``: mean AUC per row × column (missing cells blank)."""
    paths = []
    for level in LEVELS:
        values = np.array([[table.cells[level][(r, c.name)].mean for c in table.columns] for r in table.rows])
        paths.append(
            plot_heatmap(
                table.rows,
                [c.name for c in table.columns],
                values,
                out / f"{table.name}_auc_{level}.png",
                f"{table.name}: mean {level}-level AUC",
                fmt=".3f",
                vmin=0.5,
                vmax=1.0,
            )
        )
    return paths


def _per_seed_values(table: Table, row: str, column: Column, level: str) -> list[float]:
    cell = table.cells[level][(row, column.name)]
    return list(cell.values) if cell.complete else []


def _curve_axes(fig: Figure, n: int) -> list[Any]:
    return [fig.add_subplot(1, n, i + 1) for i in range(n)]


def _group_curves(table: Table, rows: list[str], x_of: Any, xlabel: str, level: str, path: Path) -> Path:
    """One panel per group column: each method's AUC vs ``x_of(row)``, mean with std over every value at that x
    (seeds, and the subsets or rows sharing it)."""
    groups = [c for c in table.columns if c.kind == "group"]
    fig = Figure(figsize=(5.0 * len(groups), 4.0))
    for ax, column in zip(_curve_axes(fig, len(groups)), groups, strict=True):
        points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in rows:
            points[method_name(row, table.info[row])][x_of(row)] += _per_seed_values(table, row, column, level)
        for method, by_x in points.items():
            xs = sorted(x for x, v in by_x.items() if v)
            if xs:
                stds = [np.std(by_x[x], ddof=1) if len(by_x[x]) > 1 else 0.0 for x in xs]
                ax.errorbar(xs, [np.mean(by_x[x]) for x in xs], yerr=stds, marker="o", capsize=3, label=method)
        ax.set(xlabel=xlabel, ylabel=f"{level}-level AUC", title=column.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def scaling_curve(table: Table, out: Path, level: str = "frame") -> list[Path]:
    """AUC per group vs N (= number of families merged), one line per merger; error bars: std over seeds and the
    family subsets of that size. Then merge seconds and peak memory vs N."""
    mergers = [r for r in table.rows if table.info[r].get("kind") == "merger"]
    if not any(c.kind == "group" for c in table.columns) or not mergers:
        return []
    n_of = lambda r: len(table.info[r].get("families") or [])  # noqa: E731
    xlabel = "N (families merged)"
    paths = [_group_curves(table, mergers, n_of, xlabel, level, out / f"{table.name}_scaling_{level}.png")]
    paths += _cost_plot(
        table,
        mergers,
        n_of,
        xlabel,
        [("merge_seconds", "merge time (s)", 1.0), ("peak_memory_bytes", "peak memory (GiB)", 2.0**-30)],
        out / f"{table.name}_scaling_cost.png",
    )
    return paths


def expansion_curve(table: Table, out: Path, level: str = "frame") -> list[Path]:
    """AUC per group (seen so far, unseen...) vs step, one line per method (mergers and joint); then cost per step."""
    rows = [r for r in table.rows if table.info[r].get("step") is not None]
    if not any(c.kind == "group" for c in table.columns) or not rows:
        return []
    step_of = lambda r: int(table.info[r]["step"])  # noqa: E731
    xlabel = "step (families seen)"
    paths = [_group_curves(table, rows, step_of, xlabel, level, out / f"{table.name}_expansion_{level}.png")]
    paths += _cost_plot(
        table,
        rows,
        step_of,
        xlabel,
        [("cost_seconds", "cost of the step (s)", 1.0)],
        out / f"{table.name}_expansion_cost.png",
    )
    return paths


def _cost_plot(
    table: Table, rows: list[str], x_of: Any, xlabel: str, keys: list[tuple[str, str, float]], path: Path
) -> list[Path]:
    """One panel per cost key: mean over the seeds' runs of each method's value vs x (rows without it skipped)."""
    fig = Figure(figsize=(5.0 * len(keys), 4.0))
    drawn = False
    for ax, (key, ylabel, scale) in zip(_curve_axes(fig, len(keys)), keys, strict=True):
        points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for seed in table.runs.seeds:
            infos = table.runs.runs[seed].metrics["rows"]
            for row in rows:
                value = (infos.get(row) or {}).get(key)
                if value is not None and math.isfinite(float(value)):
                    points[method_name(row, table.info[row])][x_of(row)].append(float(value) * scale)
        for method, by_x in points.items():
            xs = sorted(by_x)
            ax.plot(xs, [np.mean(by_x[x]) for x in xs], marker="o", label=method)
            drawn = True
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if points:
            ax.legend(fontsize="small")
    if not drawn:
        fig.clear()
        return []
    return [_save(fig, path)]
