"""Backbones through timm: the tiny CPU ViT and the CLIP image towers, with weights from a local file.

Nothing here touches the network unless the config says ``weights.hub: true``. A local file may be safetensors or a
``torch.load``-able state dict (loaded with ``weights_only=True``) in any layout of :mod:`r2m_lab.layouts` (OpenAI
CLIP, open_clip, timm, Hugging Face CLIP, DeepfakeBench/DF40 CLIP detectors); r2m_lab converts it to timm's keys
itself and refuses a file that does not fill the model exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from r2m_lab.layouts import load_backbone_file

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def check_weights_file(cfg: Mapping[str, Any]) -> Path | None:
    """The configured ``weights.path`` as a Path (None when there is none); a missing file stops at once, so a run
    can check it before it spends time on anything else."""
    path = (cfg.get("weights") or {}).get("path")
    if not path:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"Backbone weights for {cfg['name']} not found at {file}. Point backbone.weights.path at a local "
            f"safetensors or state-dict file ({', '.join(WEIGHT_SUFFIXES)}), e.g. open_clip's "
            "open_clip_pytorch_model.bin or timm's model.safetensors."
        )
    return file


def create_backbone(cfg: Mapping[str, Any], load_weights: bool = True) -> nn.Module:
    """Build the timm feature extractor (``num_classes=0``) that ``cfg`` (a ``conf/backbone/*.yaml``) describes.

    With ``load_weights`` the configured pretrained weights are loaded: ``weights.path`` (a local file, converted and
    checked key by key by :func:`r2m_lab.layouts.load_backbone_file`) first, then the hub if ``weights.hub`` allows
    it. A backbone whose config names ``weights.required: true`` and gets neither stops with a message that says how
    to provide them (a random CLIP is never used silently). A loaded file's provenance (path, sha256, layout) is kept
    as the model's ``r2m_weights_source`` attribute for θ₀'s card.
    """
    kwargs = dict(cfg.get("kwargs") or {})
    weights = cfg.get("weights") or {}
    path = weights.get("path")
    if not load_weights:
        return timm.create_model(cfg["model"], pretrained=False, num_classes=0, **kwargs)
    if path:
        file = check_weights_file(cfg)
        if weights.get("pretext"):
            # θ₀ would be the pretext's training on top of the file: neither what the file holds nor a pretext θ₀.
            raise ValueError(
                f"backbone {cfg['name']} has both weights.path={file} and a weights.pretext; θ₀ is one or the other. "
                "Set backbone.weights.pretext=null to use the file as θ₀, or drop backbone.weights.path."
            )
        model = timm.create_model(cfg["model"], pretrained=False, num_classes=0, **kwargs)
        model.r2m_weights_source = load_backbone_file(model, file, f"backbone={cfg['name']} ({cfg['model']})")
        return model
    if weights.get("hub"):
        log.warning("Downloading %s weights from the hub (backbone.weights.hub=true)", cfg["name"])
        return timm.create_model(cfg["model"], pretrained=True, num_classes=0, **kwargs)
    if weights.get("required"):
        raise FileNotFoundError(
            f"Backbone {cfg['name']} ({cfg['model']}) needs pretrained weights and none were given. Set "
            f"backbone.weights.path=/path/to/weights (safetensors or state dict; OpenAI CLIP, open_clip, timm or "
            "Hugging Face CLIP layout), or backbone.weights.hub=true to let timm download them."
        )
    return timm.create_model(cfg["model"], pretrained=False, num_classes=0, **kwargs)


def make_head(num_features: int, seed: int) -> nn.Linear:
    """The real/fake head (2 logits), initialised from ``seed`` alone so every specialist starts from the same one."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(num_features, 2)
    with torch.no_grad():
        bound = 1.0 / num_features**0.5
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    return head


def input_config(cfg: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Input size and normalisation: the backbone config's values, else timm's data config for the model."""
    data_cfg = timm.data.resolve_model_data_config(model)
    size = cfg.get("input_size") or data_cfg["input_size"][-1]
    mean = cfg.get("mean") or data_cfg["mean"]
    std = cfg.get("std") or data_cfg["std"]
    return {"input_size": int(size), "mean": tuple(float(m) for m in mean), "std": tuple(float(s) for s in std)}
