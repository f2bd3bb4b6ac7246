"""A Hydra callback that builds a sweep's tables when the sweep ends: ``<sweep dir>/tables/``.

The paper's sweeps (``experiments/*.yaml``) list it under ``hydra.callbacks``. Hydra calls ``on_multirun_end`` only
when every job succeeded (its basic sweeper re-raises a failed job first), so ``python -m r2m_lab`` also calls
:func:`build_pending` when it exits: a sweep with failed jobs still gets its tables, whose missing cells say so, and
the command that re-launches exactly those jobs (``relaunch.sh``). A builder error never hides the jobs' own errors:
it is logged with the command that rebuilds the tables by hand.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

_PENDING: dict[str, Any] = {}  # the sweep of this process whose tables are still to be built


class BuildTables(Callback):
    """Remember the sweep at its start; build its tables at its end (or at exit, see :func:`build_pending`)."""

    def __init__(self, replicates: int = 1000, seed: int = 0, confidence: float = 0.95) -> None:
        self.settings = {"replicates": int(replicates), "seed": int(seed), "confidence": float(confidence)}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _PENDING.update(sweep=Path(str(config.hydra.sweep.dir)), settings=self.settings, config=copy.deepcopy(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        build_pending()


def build_pending() -> Path | None:
    """Build the tables of the sweep this process ran, once; return their folder (None when there is nothing to do
    or the build failed, which is logged)."""
    if not _PENDING:
        return None
    sweep, settings, config = _PENDING.pop("sweep"), _PENDING.pop("settings"), _PENDING.pop("config")
    if not any(sweep.rglob(".hydra/overrides.yaml")):
        # the launcher failed before any job started (e.g. hydra/launcher=slurm where there is no SLURM): its error
        # is the news, and a table of nothing but missing cells would only delay it
        log.error("No job of the sweep %s started, so it has no tables", sweep)
        return None
    from r2m_lab.stages.tables import tables  # the builder's imports only when a sweep ends

    out = sweep / "tables"
    # stage=tables on the sweep's own config (its logger: W&B offline by default, in the sweep's group), writing
    # into <sweep dir>/tables; the hydra node goes (its runtime values belong to the jobs, not to this build)
    cfg = copy.deepcopy(config)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(out)
        cfg.stage = {
            "name": "tables",
            "runs": [str(sweep)],
            "bootstrap": settings["replicates"],
            "bootstrap_seed": settings["seed"],
            "confidence": settings["confidence"],
        }
    try:
        tables(cfg)
    except Exception:
        log.exception(
            "building the tables of %s failed; rebuild them with: python -m r2m_lab stage=tables 'stage.runs=[%s]'",
            sweep,
            sweep,
        )
        return None
    log.info("Tables of the sweep written to %s", out)
    return out
