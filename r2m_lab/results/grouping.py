"""Runs into tables: one table per (stage, distinguishing overrides), pooled over seeds, refused when it would pool
runs that must not be pooled (different benchmarks, different θ₀, two runs of one seed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from r2m_lab.evaluation.writers import safe_name
from r2m_lab.results.runs import MissingJob, Run, override_key


@dataclass
class TableRuns:
    """The runs of one table: the successful run of each seed, and the expected seeds no successful run holds."""

    stage: str
    table_overrides: tuple[str, ...]
    runs: dict[int, Run] = field(default_factory=dict)
    missing: dict[int, list[MissingJob]] = field(default_factory=dict)
    name: str = ""

    @property
    def seeds(self) -> list[int]:
        """The seeds with a successful run."""
        return sorted(self.runs)

    @property
    def expected_seeds(self) -> list[int]:
        return sorted(set(self.runs) | set(self.missing))

    @property
    def missing_seeds(self) -> list[int]:
        return sorted(set(self.missing) - set(self.runs))

    @property
    def benchmark(self) -> str | None:
        return next((r.benchmark for r in self.runs.values()), None)

    @property
    def theta0(self) -> dict[str, Any] | None:
        return next((dict(r.metrics["theta0"]) for r in self.runs.values() if r.metrics), None)

    @property
    def first(self) -> Run:
        """The run of the lowest seed: its row order and protocols head the table."""
        return self.runs[self.seeds[0]]


def _refuse_mixed(key: str, runs: Sequence[Run], what: str, value: Any) -> None:
    values = {value(r) for r in runs}
    if len(values) > 1:
        listing = "\n".join(f"  {r.folder}: {what} {value(r)}" for r in runs)
        raise ValueError(
            f"refusing to pool the runs of table {key}: they differ in {what} ({sorted(map(str, values))}). "
            f"Give them to stage.runs separately, or fix the runs:\n{listing}"
        )


def group_tables(runs: Sequence[Run], missing: Sequence[MissingJob]) -> list[TableRuns]:
    """Tables from the successful runs and the missing jobs, in order of first appearance; names set.

    Runs pool into one table when stage and distinguishing overrides agree; they must then share the benchmark
    and θ₀ (``theta0.hash``) and hold one run per seed, or the whole set is refused by name.
    """
    tables: dict[tuple[str, tuple[str, ...]], TableRuns] = {}
    members: dict[tuple[str, tuple[str, ...]], list[Run]] = {}
    for run in runs:
        if run.ok:
            key = (str(run.stage), run.table_overrides)
            members.setdefault(key, []).append(run)
    for key, group in members.items():
        label = " ".join([f"stage={key[0]}", *key[1]])
        _refuse_mixed(label, group, "benchmark", lambda r: r.benchmark)
        _refuse_mixed(label, group, "theta0.hash", lambda r: r.theta0_hash)
        table = tables.setdefault(key, TableRuns(stage=key[0], table_overrides=key[1]))
        for run in group:
            if run.seed in table.runs:
                raise ValueError(
                    f"refusing to pool the runs of table {label}: seed {run.seed} has two successful runs, "
                    f"{table.runs[run.seed].folder} and {run.folder}; give stage.runs only one of them"
                )
            table.runs[int(run.seed)] = run
    for job in missing:
        key = (job.stage, job.table_overrides)
        table = tables.setdefault(key, TableRuns(stage=key[0], table_overrides=key[1]))
        table.missing.setdefault(job.seed, []).append(job)
    name_tables(list(tables.values()))
    return list(tables.values())


def name_tables(tables: Sequence[TableRuns]) -> None:
    """``<stage>`` plus the overrides that tell the tables of one stage apart (``pipeline_backbone=clip_vit_b16``)."""
    for table in tables:
        peers = [t for t in tables if t.stage == table.stage]
        common = set.intersection(*(set(t.table_overrides) for t in peers))
        distinct = [o for o in table.table_overrides if o not in common and override_key(o) != "stage"]
        table.name = safe_name("_".join([table.stage, ",".join(distinct)]) if distinct else table.stage)
    names = [t.name for t in tables]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"tables {clashes} would share a name: {[t.table_overrides for t in tables]}")
