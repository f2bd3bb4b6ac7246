"""The experiment loggers of a run: W&B (offline by default) or CSV, built from ``cfg.logger``."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from r2m_lab.stages.config_nodes import plain


def build_logger(cfg: DictConfig, name: str, group: str | None = None) -> Any:
    """The configured Lightning logger (W&B offline by default) for one run; ``None`` when ``logger=null``."""
    if cfg.get("logger") is None:
        return None
    kwargs = {"group": group} if str(cfg.logger._target_).endswith("WandbLogger") else {}
    logger = instantiate(cfg.logger, name=name, **kwargs)
    logger.log_hyperparams(plain(cfg))
    return logger


def close_logger(logger: Any) -> None:
    """Finish a W&B run so the next run in this process starts a fresh one (W&B reuses an open run otherwise)."""
    if logger is None:
        return
    logger.finalize("success")
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()
