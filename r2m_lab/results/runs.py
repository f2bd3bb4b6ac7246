"""Run folders and sweeps: discover the jobs under the paths given, load and validate each one, and say which jobs a
sweep was launched with but does not hold (absent or failed), with the command that relaunches exactly those.

A run folder is one Hydra job: ``.hydra/overrides.yaml`` (its command-line overrides), ``.hydra/config.yaml`` (the
composed config) and, once it finished, ``metrics.json``. A sweep folder holds ``multirun.yaml`` (Hydra's config of
the whole sweep) and its job folders (nested when an override value holds a ``/``). Jobs are matched to the sweep's
expected combinations by their overrides, never by job number.

The expected jobs are expanded by Hydra's own basic sweeper code (its override parser and ``split_arguments``), so
the product is exactly the one Hydra launched: ``hydra.sweeper.params`` first, then the task overrides (a task
override replaces a sweeper param of the same key, in its place). Comma lists, ``range(...)`` and ``choice(...)``
expand; anything the basic sweeper cannot expand is refused with the sweep and the reason.

Relaunching into the same sweep folder makes Hydra overwrite its ``multirun.yaml`` with the relaunch's one-job
sweep; the relaunch script therefore first keeps the original as ``multirun.expected.yaml`` (``cp -n``), and
:func:`load_sweep` reads that copy when it exists.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

MULTIRUN = "multirun.yaml"
EXPECTED_COPY = "multirun.expected.yaml"  # the sweep's original multirun.yaml, kept by relaunch.sh
METRICS = "metrics.json"
REQUIRED_KEYS = ("stage", "benchmark", "seed", "theta0", "protocols", "models", "rows")
STAGES = ("pipeline", "scaling", "expansion", "heads")
ROW_KINDS = ("specialist", "reference", "merger")
# Override keys that do not change a run's numbers: runs differing only in these are pooled into one table.
NEUTRAL_KEYS = ("seed", "paths", "hydra", "logger", "device", "eval_batch_size")


def override_key(override: str) -> str:
    """``+a.b=1`` → ``a.b``."""
    return override.lstrip("+~").split("=", 1)[0]


def is_neutral(override: str) -> bool:
    """True for an override that does not distinguish tables (``seed=``, ``paths.*``, ``hydra.*``, ...)."""
    key = override_key(override)
    return any(key == k or key.startswith(f"{k}.") for k in NEUTRAL_KEYS)


def override_value(overrides: Iterable[str], key: str) -> str | None:
    """The value of ``key=`` among ``overrides`` (the last one wins, as in Hydra), or None."""
    value = None
    for o in overrides:
        if override_key(o) == key and "=" in o:
            value = o.split("=", 1)[1]
    return value


@dataclass
class Run:
    """One job folder. ``metrics`` is None and ``problem`` says why when the job failed or is incomplete."""

    folder: Path
    overrides: tuple[str, ...]
    stage: str | None
    benchmark: str | None
    seed: int | None
    metrics: dict[str, Any] | None = field(default=None, repr=False)
    problem: str | None = None
    sweep: Path | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def theta0_hash(self) -> str | None:
        return None if self.metrics is None else str(self.metrics["theta0"]["hash"])

    @property
    def log_files(self) -> list[Path]:
        """The job's own log(s) (``<job dir>/__main__.log`` for ``python -m r2m_lab``)."""
        return sorted(self.folder.glob("*.log"))

    @property
    def table_overrides(self) -> tuple[str, ...]:
        """The overrides that distinguish tables: every override but the neutral ones (see :data:`NEUTRAL_KEYS`)."""
        return tuple(sorted(o for o in self.overrides if not is_neutral(o)))

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (tables.json's ``runs``)."""
        return {
            "folder": str(self.folder),
            "overrides": list(self.overrides),
            "stage": self.stage,
            "benchmark": self.benchmark,
            "seed": self.seed,
            "theta0_hash": self.theta0_hash,
            "status": "ok" if self.ok else "failed",
            "problem": self.problem,
            "logs": [str(p) for p in self.log_files],
            "sweep": None if self.sweep is None else str(self.sweep),
        }


@dataclass
class Sweep:
    """A multirun folder: its config (``multirun.yaml``, or the copy kept before a relaunch) and expected jobs."""

    folder: Path
    config: dict[str, Any] = field(repr=False)
    expected: list[tuple[str, ...]]  # one override list per job, in Hydra's launch order
    config_file: Path

    @property
    def name(self) -> str:
        """``<date>/<time>`` of ``multirun/<date>/<time>``: the W&B group of the sweep's tables."""
        return "/".join(self.folder.parts[-2:])

    def stage_of(self, overrides: Sequence[str]) -> str:
        return override_value(overrides, "stage") or str(self.config.get("stage", {}).get("name"))

    def seed_of(self, overrides: Sequence[str]) -> int:
        value = override_value(overrides, "seed")
        return int(value if value is not None else self.config.get("seed"))

    def relaunch_command(self, overrides: Sequence[str]) -> str:
        """The command that relaunches exactly that job into this sweep's folder: ``python -m r2m_lab -m -cd <config
        dir> -cn <config name> <the job's overrides> <the sweep's Hydra overrides> hydra.sweep.dir=<folder>`` (config
        dir: the sweep's primary config source)."""
        hydra = self.config["hydra"]
        sources = hydra["runtime"]["config_sources"]
        # `-cd experiments` adds its folder as the "command-line" source, and that is where -cn's file lives (the
        # "main" source is r2m_lab's own conf/, which -cd does not replace)
        mains = [s for s in sources if s.get("provider") == "command-line"] or [
            s for s in sources if s.get("provider") == "main"
        ]
        if len(mains) != 1:
            raise ValueError(f"{self.config_file}: expected one primary config source, found {sources}")
        source = mains[0]
        where = (
            ["-cd", source["path"]] if source["schema"] == "file" else ["-cp", f"{source['schema']}://{source['path']}"]
        )
        # The sweep's own Hydra overrides too (hydra/launcher=slurm and its knobs, callbacks): a job of a SLURM array
        # goes back to the cluster, not onto the machine that runs the relaunch. The -m flag and the folder are added.
        kept = [
            str(o)
            for o in hydra.get("overrides", {}).get("hydra", [])
            if not str(o).startswith(("hydra.mode=", "hydra.sweep.dir="))
        ]
        args = ["python", "-m", "r2m_lab", "-m", *where, "-cn", str(hydra["job"]["config_name"]), *overrides, *kept]
        # The folder the jobs are in now (absolute), not multirun.yaml's hydra.sweep.dir: a sweep copied or moved
        # since, or launched with a relative dir from another cwd, still gets its jobs back in the same folder.
        return shlex.join([*args, f"hydra.sweep.dir={self.folder.resolve()}"])

    def keep_config_command(self) -> str:
        """``cp -n multirun.yaml multirun.expected.yaml``: run before a relaunch, which overwrites multirun.yaml."""
        return shlex.join(["cp", "-n", str(self.folder / MULTIRUN), str(self.folder / EXPECTED_COPY)])


def expand_sweep(config: Mapping[str, Any], where: Path) -> list[tuple[str, ...]]:
    """Every job's overrides of a sweep, expanded as Hydra's basic sweeper does (see the module docstring)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = config["hydra"]
    params = hydra.get("sweeper", {}).get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in hydra["overrides"]["task"]]
    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
        (batch,) = BasicSweeper.split_arguments(parsed, None)
    except Exception as exc:  # Hydra's parser and sweeper raise their own exception types
        raise ValueError(
            f"cannot expand the sweep of {where} ({arguments}) into its jobs: {exc}. The table builder expands what "
            "Hydra's basic sweeper expands (comma lists, range(...), choice(...))."
        ) from exc
    return [tuple(job) for job in batch]


def load_sweep(folder: Path) -> Sweep:
    """The sweep in ``folder`` (its ``multirun.expected.yaml`` when a relaunch kept one, else ``multirun.yaml``)."""
    config_file = folder / EXPECTED_COPY if (folder / EXPECTED_COPY).is_file() else folder / MULTIRUN
    config = yaml.safe_load(config_file.read_text())
    if not isinstance(config, dict) or "hydra" not in config:
        raise ValueError(f"{config_file} is not a Hydra multirun config (no 'hydra' node)")
    return Sweep(folder=folder, config=config, expected=expand_sweep(config, config_file), config_file=config_file)


def _problem(metrics: Any, folder: Path) -> str | None:
    """Why a metrics.json cannot be tabulated (None when it can)."""
    if not isinstance(metrics, dict):
        return f"{folder / METRICS} is not a JSON object"
    lacking = [k for k in REQUIRED_KEYS if k not in metrics]
    if lacking:
        return f"{folder / METRICS} lacks {', '.join(lacking)} (not a run report of a table stage)"
    if metrics["stage"] not in STAGES:
        return f"{folder / METRICS}: stage {metrics['stage']!r} is not a table stage {STAGES}"
    if not isinstance(metrics["theta0"], dict) or "hash" not in metrics["theta0"]:
        return f"{folder / METRICS}: theta0 has no hash"
    unknown = [r for r in metrics["rows"] if r not in metrics["models"]]
    if unknown:
        return f"{folder / METRICS}: rows {unknown} have no entry under models"
    kinds = {r: i.get("kind") for r, i in metrics["rows"].items() if i.get("kind") not in ROW_KINDS}
    if kinds:
        return f"{folder / METRICS}: rows of unknown kind {kinds} (kinds: {ROW_KINDS})"
    return None


def load_run(folder: Path, sweep: Path | None = None) -> Run:
    """One job folder; a job without a usable metrics.json comes back with ``problem`` set (never raised)."""
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = tuple(str(o) for o in (yaml.safe_load(overrides_file.read_text()) or []))
    config_file = folder / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    stage = (config.get("stage") or {}).get("name")
    benchmark = (config.get("benchmark") or {}).get("name")
    seed = config.get("seed")
    metrics_file = folder / METRICS
    if not metrics_file.is_file():
        problem = f"no {METRICS} (the job failed or has not finished)"
        return Run(folder, overrides, stage, benchmark, seed, problem=problem, sweep=sweep)
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as exc:
        return Run(folder, overrides, stage, benchmark, seed, problem=f"{metrics_file}: {exc}", sweep=sweep)
    problem = _problem(metrics, folder)
    if problem is not None:
        return Run(folder, overrides, stage, benchmark, seed, problem=problem, sweep=sweep)
    return Run(
        folder,
        overrides,
        str(metrics["stage"]),
        str(metrics["benchmark"]),
        int(metrics["seed"]),
        metrics=metrics,
        sweep=sweep,
    )


def _job_folders(folder: Path) -> list[Path]:
    """Every folder under ``folder`` holding ``.hydra/overrides.yaml`` (a job; nested when an override has ``/``)."""
    return sorted(p.parent.parent for p in folder.rglob(".hydra/overrides.yaml"))


def discover(paths: Sequence[str | Path]) -> tuple[list[Run], list[Sweep]]:
    """Every run and sweep under ``paths`` (sweep folders, run folders, or folders holding them).

    A path that does not exist, or under which neither a sweep (``multirun.yaml``) nor a run folder
    (``.hydra/overrides.yaml``) is found, is refused by name.
    """
    if not paths:
        raise ValueError("stage.runs is empty: give sweep folders and/or run folders, e.g. stage.runs=[multirun/...]")
    runs: dict[Path, Run] = {}
    sweeps: dict[Path, Sweep] = {}
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"stage.runs: {given} does not exist (resolved: {path.resolve()})")
        if not path.is_dir():
            raise NotADirectoryError(f"stage.runs: {given} is not a folder (give a sweep or run folder)")
        sweep_dirs = sorted({p.parent for p in path.rglob(MULTIRUN)} | {p.parent for p in path.rglob(EXPECTED_COPY)})
        jobs = _job_folders(path)
        if not sweep_dirs and not jobs:
            raise FileNotFoundError(
                f"stage.runs: no runs under {given}: searched it and its sub-folders for sweeps ({MULTIRUN}) and "
                "run folders (.hydra/overrides.yaml)"
            )
        for sweep_dir in sweep_dirs:
            sweeps.setdefault(sweep_dir.resolve(), load_sweep(sweep_dir))
        for job in jobs:
            owner = next((s for s in sweep_dirs if s in job.parents), None)
            runs.setdefault(job.resolve(), load_run(job, owner))
    return list(runs.values()), list(sweeps.values())


@dataclass
class MissingJob:
    """An expected job that is absent or failed: the table it belongs to, its seed, and how to relaunch it."""

    stage: str
    table_overrides: tuple[str, ...]
    seed: int
    overrides: tuple[str, ...]
    reason: str
    command: str | None
    folder: Path | None = None
    logs: list[Path] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "table_overrides": list(self.table_overrides),
            "seed": self.seed,
            "overrides": list(self.overrides),
            "reason": self.reason,
            "command": self.command,
            "folder": None if self.folder is None else str(self.folder),
            "logs": [str(p) for p in self.logs],
        }


def missing_jobs(runs: Sequence[Run], sweeps: Sequence[Sweep]) -> tuple[list[MissingJob], list[str]]:
    """The expected jobs of every sweep that no successful run holds, and warnings (jobs a sweep did not expect).

    A failed run outside any sweep is missing too, without a command (its folder and log say what happened).
    """
    missing: list[MissingJob] = []
    warnings: list[str] = []
    for sweep in sweeps:
        mine = [r for r in runs if r.sweep is not None and r.sweep.resolve() == sweep.folder.resolve()]
        by_overrides: dict[frozenset[str], list[Run]] = {}
        for run in mine:
            by_overrides.setdefault(frozenset(run.overrides), []).append(run)
        expected = {frozenset(job) for job in sweep.expected}
        for run in mine:
            if frozenset(run.overrides) not in expected:
                warnings.append(
                    f"{run.folder} is not one of the jobs of {sweep.config_file} (was multirun.yaml overwritten by a "
                    f"relaunch without keeping {EXPECTED_COPY}?)"
                )
        for job in sweep.expected:
            present = by_overrides.get(frozenset(job), [])
            if any(r.ok for r in present):
                continue
            failed = present[-1] if present else None
            missing.append(
                MissingJob(
                    stage=sweep.stage_of(job),
                    table_overrides=tuple(sorted(o for o in job if not is_neutral(o))),
                    seed=sweep.seed_of(job),
                    overrides=job,
                    reason=f"failed: {failed.problem}" if failed else "absent: no job folder with these overrides",
                    command=sweep.relaunch_command(job),
                    folder=failed.folder if failed else None,
                    logs=failed.log_files if failed else [],
                )
            )
    for run in runs:
        if run.sweep is None and not run.ok:
            missing.append(
                MissingJob(
                    stage=str(run.stage),
                    table_overrides=run.table_overrides,
                    seed=int(run.seed) if run.seed is not None else -1,
                    overrides=run.overrides,
                    reason=f"failed: {run.problem}",
                    command=None,
                    folder=run.folder,
                    logs=run.log_files,
                )
            )
    return missing, warnings


def relaunch_script(missing: Sequence[MissingJob], sweeps: Sequence[Sweep]) -> str:
    """``relaunch.sh``: keep each affected sweep's multirun.yaml, then one command per missing job."""
    lines = [
        "#!/usr/bin/env bash",
        "# Relaunch exactly the missing or failed jobs of the sweeps (written by stage=tables).",
        "set -euo pipefail",
    ]
    affected = {m.command for m in missing if m.command}
    for sweep in sweeps:
        if any(sweep.relaunch_command(j) in affected for j in sweep.expected):
            lines.append(sweep.keep_config_command())
    lines += [m.command for m in missing if m.command]
    return "\n".join(lines) + "\n"
