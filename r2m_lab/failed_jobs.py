"""A Hydra callback that keeps every failed job of a run, so a sweep reports all of its failures, not only the first.

Hydra's basic launcher runs every job of a sweep and then re-raises the first failure alone. Each job's traceback is
already in its own log (``<job dir>/<task>.log``, written by ``r2m_lab.__main__``); this callback names each failure
as it happens and :func:`report` lists them all when the command ends. Configured in ``conf/hydra/default.yaml``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TextIO

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

FAILURES: list[dict[str, str]] = []  # this process's failed jobs, in the order they ran


class FailedJobs(Callback):
    """Record each failed job: its number, overrides, error and log file."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        runtime = config.hydra.runtime
        error = job_return._return_value  # the exception itself (reading .return_value would raise it)
        failure = {
            "job": str(config.hydra.job.get("num", 0)),
            "overrides": " ".join(job_return.overrides or []),
            "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
            "log": str(Path(runtime.output_dir) / f"{config.hydra.job.name}.log"),
        }
        if config.hydra.mode != RunMode.MULTIRUN:
            return  # a single run: Hydra prints its error, and its log holds the traceback
        FAILURES.append(failure)
        log.error("job %s (%s) failed: %s (traceback in %s)", *failure.values())


def report(stream: TextIO) -> int:
    """Write a summary of every failed job of a sweep to ``stream`` (nothing when none failed); return the count."""
    if FAILURES:
        lines = [f"{len(FAILURES)} job(s) failed:"]
        lines += [f"  job {f['job']} ({f['overrides']}): {f['error']}\n    log: {f['log']}" for f in FAILURES]
        stream.write("\n".join(lines) + "\n")
    return len(FAILURES)
