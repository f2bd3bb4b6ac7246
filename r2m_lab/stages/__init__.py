"""Stages: ``stage(cfg) -> dict``, the only code that reads the whole config; ``STAGES`` dispatches by name.

``STAGES`` maps a stage name to where its function lives, imported only when that stage runs: one stage does not
pay for the imports of all the others (Lightning, torchmetrics, matplotlib...), so a command that stops on bad input
answers in seconds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

STAGES: dict[str, str] = {
    "finetune": "r2m_lab.stages.finetune:finetune",
    "merge": "r2m_lab.stages.merge:merge",
    "evaluate": "r2m_lab.stages.evaluate:evaluate",
    "pipeline": "r2m_lab.stages.pipeline:pipeline",
    "preprocess": "r2m_lab.stages.preprocess:preprocess",
    "import": "r2m_lab.stages.import_ckpt:import_checkpoints",
    "predict": "r2m_lab.stages.predict:predict",
    "scaling": "r2m_lab.stages.scaling:scaling",
    "expansion": "r2m_lab.stages.expansion:expansion",
    "heads": "r2m_lab.stages.heads:heads",
    "tables": "r2m_lab.stages.tables:tables",
    "analyze": "r2m_lab.stages.analyze:analyze",
}


def stage_function(name: str) -> Callable[[DictConfig], dict[str, Any]]:
    """The function of stage ``name`` (its module imported now); an unknown name lists the valid ones."""
    if name not in STAGES:
        raise ValueError(f"Unknown stage {name!r}; valid stages: {sorted(STAGES)}")
    module, attr = STAGES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    return stage_function(cfg.stage.name)(cfg)
