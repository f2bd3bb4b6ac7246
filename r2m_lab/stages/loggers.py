"""The experiment loggers of a run: W&B (offline by default) or CSV, built from ``cfg.logger``.

W&B's mode has two sources: ``logger.offline`` and the ``WANDB_MODE`` environment variable. The variable wins (as W&B
documents it): a run never goes online when the environment says offline or disabled, and never stays offline when
it says online. When the two disagree a warning names both, and the mode that took effect is recorded in the run's
hyper-parameters (``wandb_mode``) and on the logger (``r2m_wandb_mode``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from r2m_lab.stages.config_nodes import plain

log = logging.getLogger(__name__)

# The user's WANDB_MODE, read before Lightning can change it: WandbLogger(offline=True) writes WANDB_MODE=dryrun into
# os.environ, which would otherwise leak into every later run of the same process (a sweep's next job).
_USER_WANDB_MODE = os.environ.get("WANDB_MODE")
_ALIASES = {"dryrun": "offline", "run": "online", "shared": "online"}


def wandb_mode(offline: bool, env: str | None) -> tuple[str, str | None]:
    """The W&B mode that takes effect for ``logger.offline`` under ``WANDB_MODE=env`` (None: unset), and a warning
    when the environment overrides what the config asked for."""
    asked = "offline" if offline else "online"
    if env is None or not env.strip():
        return asked, None
    mode = _ALIASES.get(env.strip().lower(), env.strip().lower())
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"WANDB_MODE={env!r} in the environment is not a W&B mode (online | offline | disabled)")
    if mode == asked:
        return mode, None
    return mode, (
        f"logger.offline={str(offline).lower()} asks for an {asked} W&B run, but WANDB_MODE={env} in the environment "
        f"makes it {mode} (W&B's environment variable takes precedence). "
        + ("Unset WANDB_MODE (or set WANDB_MODE=online) to log online." if asked == "online" else "")
        + ("Use logger=csv for local metrics without W&B." if mode == "disabled" else "")
        + ("Unset WANDB_MODE to keep runs offline." if mode == "online" else "")
    )


def run_identity(cfg: DictConfig, part: str | None = None, group: str | None = None) -> dict[str, str | None]:
    """How a W&B run is filed: ``group``, ``job_type`` and ``name``.

    - ``group``: in a Hydra sweep, the sweep's name and launch time (``<config name or stage>@<date>_<time>`` from
      ``hydra.sweep.dir``), shared by every job and every training run inside them, so one sweep is one W&B group;
      outside a sweep, ``group`` as given (the pipeline passes its run folder's name) or none.
    - ``job_type``: the stage (``finetune`` for a fine-tune inside the pipeline: ``part`` starts with its kind).
    - ``name``: the job's overrides (``seed=1,stage.families=[swap,edit]``), or the stage without any, then ``part``.

    A ``stage=tables`` run keeps the group it is given (the sweep it built, see ``stages/tables.py``) and is named
    ``part``.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    stage = str(cfg.stage.name)
    if stage == "tables":  # a tables run is filed with the sweep it built (its group given) and named after it
        return {"group": group, "job_type": stage, "name": part or stage}
    overrides = ""
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        overrides = str(hydra_cfg.job.override_dirname or "")
        if hydra_cfg.mode == RunMode.MULTIRUN:
            group = sweep_group(str(hydra_cfg.job.config_name or "config"), stage, hydra_cfg.sweep.dir)
    job_type = "finetune" if part and part.split("-", 1)[0] in ("specialist", "joint") else stage
    name = " ".join(p for p in (overrides or stage, part) if p)
    return {"group": group, "job_type": job_type, "name": name}


def sweep_group(config_name: str, stage: str, sweep_dir: str | Path) -> str:
    """The W&B group of a sweep: ``<sweep config name, or the stage for a plain -m>@<date>_<time>`` (the last two
    parts of ``hydra.sweep.dir``), shared by its jobs and by the tables built from it."""
    sweep = Path(str(sweep_dir))
    launch = "_".join(sweep.parts[-2:]) if len(sweep.parts) >= 2 else sweep.name
    return f"{stage if config_name == 'config' else config_name}@{launch}"


def build_logger(cfg: DictConfig, name: str | None = None, group: str | None = None) -> Any:
    """The configured Lightning logger (W&B offline by default) for one run; ``None`` when ``logger=null``.

    ``name`` is the part of the job this run logs (``specialist-synthetic_swap``; none for the job's own report);
    the W&B group, job type and run name come from :func:`run_identity`.
    """
    if cfg.get("logger") is None:
        return None
    identity = run_identity(cfg, name, group)
    if not str(cfg.logger._target_).endswith("WandbLogger"):
        logger = instantiate(cfg.logger, name=name or str(cfg.stage.name))
        logger.log_hyperparams(plain(cfg))
        return logger
    mode, warning = wandb_mode(bool(cfg.logger.get("offline", False)), _USER_WANDB_MODE)
    if warning:
        log.warning(warning)
    if _USER_WANDB_MODE is None:
        os.environ.pop("WANDB_MODE", None)  # undo an earlier run's dryrun (see _USER_WANDB_MODE)
    else:
        os.environ["WANDB_MODE"] = _USER_WANDB_MODE
    # mode= goes to wandb.init and beats every other source, so the mode decided above is the one that happens;
    # offline=False keeps Lightning from writing WANDB_MODE=dryrun into this process's environment.
    logger = instantiate(cfg.logger, **identity, offline=False, mode=mode)
    logger.r2m_wandb_mode = mode
    logger.log_hyperparams({**plain(cfg), "wandb_mode": mode})
    return logger


def close_logger(logger: Any) -> None:
    """Finish a W&B run so the next run in this process starts a fresh one (W&B reuses an open run otherwise)."""
    if logger is None:
        return
    logger.finalize("success")
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()
