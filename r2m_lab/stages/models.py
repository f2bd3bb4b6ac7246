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
        raise ValueError(f"{checkpoint.path} {err}\n{_provenance(cfg, checkpoint)}") from err


def _provenance(cfg: DictConfig, checkpoint: Checkpoint) -> str:
    """Where a checkpoint that does not fit came from (its card) against what this config builds."""
    from r2m_lab.stages.artifacts import recipe_tag  # artifacts imports nothing from here; kept local all the same

    card = checkpoint.card()
    made = card.get("architecture", {}).get("kwargs", "not recorded")
    return (
        f"It is a {card.get('kind', checkpoint.metadata.get('kind', 'detector'))} of backbone "
        f"{card.get('backbone', '?')} under recipe {card.get('recipe_tag', 'not recorded')} (architecture {made}); "
        f"this config builds {recipe_tag(cfg)} (architecture {plain(cfg.backbone.kwargs)}). A debug=smoke artifact, "
        "for instance, only loads with debug=smoke."
    )


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
        # torch's message lists every mismatched tensor (137 lines for a smoke checkpoint): summarise it instead
        summary = _misfit(model.backbone.state_dict(), backbone_state) or str(err)
        raise ValueError(f"does not fit backbone={cfg.backbone.name} ({cfg.backbone.model}): {summary}") from err
    return model


def _misfit(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """A few lines on how ``given`` differs from ``expected`` (missing / unexpected keys, other shapes)."""
    shapes = [k for k in expected.keys() & given.keys() if tuple(expected[k].shape) != tuple(given[k].shape)]
    parts = []
    if shapes:
        k = sorted(shapes)[0]
        parts.append(
            f"{len(shapes)} tensor(s) have other shapes (e.g. {k}: checkpoint {tuple(given[k].shape)}, "
            f"model {tuple(expected[k].shape)})"
        )
    for what, keys in (("missing", expected.keys() - given.keys()), ("unexpected", given.keys() - expected.keys())):
        if keys:
            parts.append(f"{len(keys)} {what} key(s) (e.g. {sorted(keys)[0]})")
    return "; ".join(parts)


def model_input_config(cfg: DictConfig, model: Detector) -> dict[str, Any]:
    """Input size and normalisation of ``model`` under ``cfg.backbone`` (see backbones.input_config)."""
    return input_config(plain(cfg.backbone), model.backbone)
