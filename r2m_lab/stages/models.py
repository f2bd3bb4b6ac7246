"""Detectors of the configured architecture built from checkpoints or in-memory weights, and where they run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from r2m_lab.backbones import create_backbone, input_config
from r2m_lab.detector import Detector
from r2m_lab.stages.config_nodes import plain
from r2m_lab.weights import Checkpoint


def resolve_device(cfg: DictConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def load_detector(cfg: DictConfig, checkpoint: Checkpoint, with_optimizer: bool = False) -> Detector:
    """A Detector with the backbone architecture of ``cfg`` and the weights of ``checkpoint`` (strict load)."""
    try:
        return detector_from_state(cfg, checkpoint.backbone_state(), checkpoint.head, with_optimizer)
    except ValueError as err:
        raise ValueError(f"{checkpoint.path} {err}") from err


def detector_from_state(
    cfg: DictConfig,
    backbone_state: Mapping[str, torch.Tensor],
    head_state: Mapping[str, torch.Tensor],
    with_optimizer: bool = False,
) -> Detector:
    """A Detector of ``cfg``'s architecture holding these weights (strict load), e.g. a merge that is not saved."""
    backbone = create_backbone(plain(cfg.backbone), load_weights=False)
    head = torch.nn.Linear(backbone.num_features, 2)
    optimizer = instantiate(cfg.backbone.recipe.optimizer) if with_optimizer else None
    model = Detector(backbone, head, optimizer)
    try:
        model.load_weights(backbone_state, head_state)
    except RuntimeError as err:
        raise ValueError(f"does not fit backbone={cfg.backbone.name} ({cfg.backbone.model}): {err}") from err
    return model


def model_input_config(cfg: DictConfig, model: Detector) -> dict[str, Any]:
    """Input size and normalisation of ``model`` under ``cfg.backbone`` (see backbones.input_config)."""
    return input_config(plain(cfg.backbone), model.backbone)
