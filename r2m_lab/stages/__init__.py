"""Stages: ``stage(cfg) -> dict``, the only code that reads the whole config; ``STAGES`` dispatches by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from r2m_lab.stages.analyze import analyze
from r2m_lab.stages.evaluate import evaluate
from r2m_lab.stages.expansion import expansion
from r2m_lab.stages.finetune import finetune
from r2m_lab.stages.heads import heads
from r2m_lab.stages.import_ckpt import import_checkpoints
from r2m_lab.stages.merge import merge
from r2m_lab.stages.pipeline import pipeline
from r2m_lab.stages.predict import predict
from r2m_lab.stages.preprocess import preprocess
from r2m_lab.stages.scaling import scaling
from r2m_lab.stages.tables import tables

STAGES: dict[str, Callable[[DictConfig], dict[str, Any]]] = {
    "finetune": finetune,
    "merge": merge,
    "evaluate": evaluate,
    "pipeline": pipeline,
    "preprocess": preprocess,
    "import": import_checkpoints,
    "predict": predict,
    "scaling": scaling,
    "expansion": expansion,
    "heads": heads,
    "tables": tables,
    "analyze": analyze,
}


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    name = cfg.stage.name
    if name not in STAGES:
        raise ValueError(f"Unknown stage {name!r}; valid stages: {sorted(STAGES)}")
    return STAGES[name](cfg)
