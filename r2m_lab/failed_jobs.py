"""A Hydra callback that keeps every failed job of a run, so a sweep reports all of its failures, not only the first.

Hydra's basic launcher runs every job of a sweep and then re-raises the first failure alone. Each job's traceback is
already in its own log (``<job dir>/<task>.log``, written by ``r2m_lab.__main__``); this callback names each failure
as it happens and :func:`report` lists them all when the command ends. Configured in ``conf/hydra/default.yaml``.

Launchers that run each job in a process of its own (``hydra/launcher=submitit_local``, ``slurm``: the job's
``on_job_*`` callbacks run there, the sweep's in the launching process) leave the launching process nothing in
memory, so every job of a sweep also writes its state to ``<job dir>/job_status.json`` (``running`` when it starts,
``completed`` or ``failed`` when it ends) and :func:`report` reads them back: a job left ``running`` when the command
ends died without a Python error (killed, out of memory, timed out) or is still running.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, TextIO

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from r2m_lab.atomic import write_json_atomic

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"  # in each job's folder of a sweep
FAILURES: list[dict[str, str]] = []  # this process's failed jobs, in the order they ran
_SWEEP: dict[str, Path] = {}  # the sweep this process launched (its folder), read back by report()


def _job_record(config: DictConfig, status: str) -> dict[str, str]:
    runtime = config.hydra.runtime
    return {
        "job": str(config.hydra.job.get("num", 0)),
        "overrides": " ".join(config.hydra.overrides.task or []),
        "status": status,
        "log": str(Path(runtime.output_dir) / f"{config.hydra.job.name}.log"),
    }


class FailedJobs(Callback):
    """Record each job of a sweep (its number, overrides, state and log file); name each failure as it happens."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        _SWEEP["dir"] = sweep
        # A sweep folder relaunched into (the tables' relaunch.sh) still holds its earlier jobs' states: only this
        # command's jobs are reported.
        for stale in sweep.rglob(STATUS_FILE) if sweep.is_dir() else []:
            stale.unlink(missing_ok=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            write_json_atomic(Path(config.hydra.runtime.output_dir) / STATUS_FILE, _job_record(config, "running"))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return  # a single run: Hydra prints its error, and its log holds the traceback
        failed = job_return.status == JobStatus.FAILED
        record = _job_record(config, "failed" if failed else "completed")
        if failed:
            error = job_return._return_value  # the exception itself (reading .return_value would raise it)
            record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            FAILURES.append(record)
            fields = (record[k] for k in ("job", "overrides", "error", "log"))
            log.error("job %s (%s) failed: %s (traceback in %s)", *fields)
        write_json_atomic(Path(config.hydra.runtime.output_dir) / STATUS_FILE, record)


def _sweep_records() -> list[dict[str, str]]:
    """The failed and unfinished jobs recorded in this process's sweep folder (by jobs in other processes too)."""
    sweep = _SWEEP.get("dir")
    if sweep is None or not sweep.is_dir():
        return []
    records = []
    for path in sweep.rglob(STATUS_FILE):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:  # written atomically, so only an outside edit gets here
            log.warning("unreadable job state %s: %s", path, exc)
            continue
        if record.get("status") == "running":
            record["error"] = (
                "did not finish: no Python error was raised (killed, out of memory, timed out, or still running); "
                f"the launcher's own logs are under {sweep / '.submitit'} for submitit launchers"
            )
        if record.get("status") in ("failed", "running"):
            records.append(record)
    return records


def report(stream: TextIO) -> int:
    """Write a summary of every failed or unfinished job of a sweep to ``stream`` (nothing when none failed); return
    the count. Failures seen in this process and those the sweep's jobs recorded in their folders, each once."""
    failures = {f["log"]: f for f in FAILURES}
    for record in _sweep_records():
        failures.setdefault(record["log"], record)
    if failures:
        ordered = sorted(failures.values(), key=lambda f: int(f["job"]) if f["job"].isdigit() else -1)
        lines = [f"{len(ordered)} job(s) failed:"]
        lines += [f"  job {f['job']} ({f['overrides']}): {f['error']}\n    log: {f['log']}" for f in ordered]
        stream.write("\n".join(lines) + "\n")
    return len(failures)
