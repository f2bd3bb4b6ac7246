"""The table builder end to end: discover runs → expected vs present jobs → tables → files.

Writes, under ``out`` (the stage's run folder):

==============================  ==================================================================================
``tables/<table>.{md,csv,tex}``  each table, frame and video level (:mod:`r2m_lab.results.render`)
``tables/pairs_{frame,video}.csv``  every merger − ``r2m`` / ``average`` difference with its bootstrap interval
``plots/*.png``                  heatmaps; scaling and expansion curves for those stages
``tables.json``                  everything machine-readable: bootstrap settings, runs used, missing jobs, cells
``relaunch.sh``                  when jobs are missing or failed: the commands that relaunch exactly those
==============================  ==================================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r2m_lab.atomic import write_json_atomic, write_text_atomic
from r2m_lab.results import plots, render
from r2m_lab.results.grouping import TableRuns, group_tables
from r2m_lab.results.runs import MissingJob, Run, Sweep, discover, missing_jobs, relaunch_script
from r2m_lab.results.tables import LEVELS, Table, build_table

log = logging.getLogger(__name__)

BOOTSTRAP_METHOD = (
    "paired percentile bootstrap of AUC differences: test videos resampled with replacement within each set "
    "(frame AUC weights every frame by its video's count), seeds resampled with replacement first when a table has "
    "several (two-level); one draw per replicate shared by all rows; numpy default_rng(seed)"
)


@dataclass
class BuildResult:
    """What :func:`build_tables` made: the tables, the empty tables (only missing jobs), files and the summary."""

    tables: list[Table]
    empty: list[TableRuns]
    runs: list[Run]
    sweeps: list[Sweep]
    missing: list[MissingJob]
    warnings: list[str]
    markdown: str
    files: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _cell_json(cell: Any) -> dict[str, Any]:
    return {
        "text": cell.text(),
        "mean": cell.mean,
        "std": cell.std,
        "values": cell.values,
        "missing": cell.missing,
        "mark": cell.mark,
        "metrics": cell.extra,
    }


def table_json(table: Table) -> dict[str, Any]:
    return {
        "name": table.name,
        "stage": table.runs.stage,
        "benchmark": table.runs.benchmark,
        "theta0": table.runs.theta0,
        "overrides": list(table.runs.table_overrides),
        "seeds": table.runs.seeds,
        "missing_seeds": table.runs.missing_seeds,
        "runs": {str(s): str(r.folder) for s, r in table.runs.runs.items()},
        "columns": [{"name": c.name, "kind": c.kind, "key": c.key} for c in table.columns],
        "row_order": list(table.rows),  # tables.json is key-sorted: the display order is this list
        "rows": {r: table.info[r] for r in table.rows},
        "levels": {
            level: {
                r: {
                    c.name: _cell_json(table.cells[level][(r, c.name)])
                    for c in table.columns
                    if table.cells[level][(r, c.name)].applicable
                }
                for r in table.rows
            }
            for level in LEVELS
        },
        "best": table.best,
        "pairs": table.pairs,
    }


def _summary_markdown(result: BuildResult, relaunch: Path | None) -> str:
    lines = []
    if result.missing:
        lines += ["# Missing or failed jobs", ""]
        for job in result.missing:
            where = f" (folder {job.folder}; log {', '.join(map(str, job.logs)) or 'none'})" if job.folder else ""
            lines.append(f"- {job.stage} seed {job.seed} [{' '.join(job.overrides)}]: {job.reason}{where}")
        commands = [j.command for j in result.missing if j.command]
        if commands:
            lines += ["", f"Relaunch exactly these jobs ({relaunch}):", "", "```", *commands, "```"]
        lines.append("")
    for table in result.empty:
        lines.append(
            f"Table {table.name}: no successful run (seeds {', '.join(map(str, table.missing_seeds))} missing)"
        )
    lines += [f"Warning: {w}" for w in result.warnings]
    return "\n".join(lines).rstrip() + ("\n" if lines else "")


def build_tables(
    paths: Sequence[str | Path], out: Path, replicates: int = 1000, seed: int = 0, confidence: float = 0.95
) -> BuildResult:
    """Build every table of the runs under ``paths`` and write them under ``out`` (see the module docstring)."""
    runs, sweeps = discover(paths)
    missing, warnings = missing_jobs(runs, sweeps)
    for warning in warnings:
        log.warning(warning)
    groups = group_tables(runs, missing)
    tables = []
    for group in groups:
        if group.runs:
            log.info(
                "table %s: %d seed(s) %s, %d missing",
                group.name,
                len(group.seeds),
                group.seeds,
                len(group.missing_seeds),
            )
            tables.append(build_table(group, replicates, seed, confidence))
    result = BuildResult(tables, [g for g in groups if not g.runs], runs, sweeps, missing, warnings, markdown="")

    files: list[Path] = []
    for table in tables:
        stem = out / "tables" / table.name
        files.append(
            write_text_atomic(stem.with_name(stem.name + ".md"), render.to_markdown(table, confidence, replicates))
        )
        files.append(write_text_atomic(stem.with_name(stem.name + ".csv"), render.to_csv(table)))
        files.append(
            write_text_atomic(stem.with_name(stem.name + ".tex"), render.to_latex(table, confidence, replicates))
        )
        files += plots.heatmaps(table, out / "plots")
        if table.runs.stage == "scaling":
            files += plots.scaling_curve(table, out / "plots")
        if table.runs.stage == "expansion":
            files += plots.expansion_curve(table, out / "plots")
    for level in LEVELS:
        files.append(write_text_atomic(out / "tables" / f"pairs_{level}.csv", render.pairs_csv(tables, level)))
    relaunch = None
    if any(j.command for j in missing):
        relaunch = write_text_atomic(out / "relaunch.sh", relaunch_script(missing, sweeps))
        relaunch.chmod(0o755)
        files.append(relaunch)

    summary = {
        "bootstrap": {"replicates": replicates, "seed": seed, "confidence": confidence, "method": BOOTSTRAP_METHOD},
        "inputs": [str(p) for p in paths],
        "runs": [r.describe() for r in runs],
        "sweeps": [
            {"folder": str(s.folder), "config": str(s.config_file), "expected_jobs": [list(j) for j in s.expected]}
            for s in sweeps
        ],
        "missing": [m.describe() for m in missing],
        "relaunch": [m.command for m in missing if m.command],
        "warnings": warnings,
        "tables": [table_json(t) for t in tables],
        "tables_without_runs": [{"name": g.name, "missing_seeds": g.missing_seeds} for g in result.empty],
    }
    files.append(write_json_atomic(out / "tables.json", summary))
    parts = [render.to_markdown(t, confidence, replicates) for t in tables]
    result.markdown = "\n".join([*parts, _summary_markdown(result, relaunch)]).rstrip() + "\n"
    result.files, result.summary = files, summary
    return result
