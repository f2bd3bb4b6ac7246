"""``python -m r2m_lab [overrides]``: the Hydra entry point. Everything else is in :mod:`r2m_lab.stages`."""

import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("r2m_lab")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from r2m_lab.threads import apply_threads, passive_openmp_wait

    passive_openmp_wait()  # before torch loads OpenMP: waiting threads sleep instead of spinning (see threads.py)
    from r2m_lab.memory import reuse_freed_memory
    from r2m_lab.stages import run_stage  # imported here so `--help` and config errors answer fast

    apply_threads(cfg.get("threads"))  # before any tensor work: every phase of the stage runs with this count
    reuse_freed_memory()  # large merges reuse freed memory instead of page-faulting it in again (see memory.py)
    try:
        run_stage(cfg)
    except Exception:
        # Into this job's own log (<run dir>/__main__.log): a sweep's failed jobs each keep their traceback there.
        log.exception("stage=%s failed", cfg.stage.name)
        raise


if __name__ == "__main__":
    from r2m_lab.failed_jobs import report
    from r2m_lab.results.callback import build_pending

    try:
        main()
    finally:
        report(sys.stderr)  # every failed job of a sweep, not only the first one Hydra re-raises
        build_pending()  # a paper sweep with failed jobs still gets its tables, missing cells marked
