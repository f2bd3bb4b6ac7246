"""Where artifacts live: stable paths under ``paths.artifacts_dir`` (θ₀, specialists, merges) and the run folder.

Paths are a function of the config alone, so a later stage (merge, evaluate, predict) finds what an earlier one wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from r2m_lab.stages.config_nodes import fingerprint, plain
from r2m_lab.stages.merger_config import merger_hparams, merger_name


def output_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def artifacts_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.artifacts_dir)


def base_recipe(cfg: DictConfig) -> dict[str, Any]:
    """What θ₀ depends on: the architecture, its weights, the head seed and (for a pretext) the pretext data."""
    b = plain(cfg.backbone)
    recipe = {k: b.get(k) for k in ("name", "model", "kwargs", "weights", "head_seed")}
    if b["weights"].get("pretext"):
        recipe["pretext_data"] = plain(cfg.synthetic)
    return recipe


def base_path(cfg: DictConfig) -> Path:
    return artifacts_dir(cfg) / "base" / f"{cfg.backbone.name}-{fingerprint(base_recipe(cfg))}.safetensors"


def specialist_path(cfg: DictConfig, data_name: str) -> Path:
    return artifacts_dir(cfg) / "specialists" / cfg.backbone.name / f"seed{cfg.seed}" / f"{data_name}.safetensors"


def merged_path(cfg: DictConfig, merger_cfg: Mapping[str, Any]) -> Path:
    tag = fingerprint({"merger": merger_hparams(merger_cfg), "specialists": specialist_names(cfg)}, 8)
    return (
        artifacts_dir(cfg)
        / "merged"
        / cfg.backbone.name
        / cfg.benchmark.name
        / f"seed{cfg.seed}"
        / f"{merger_name(merger_cfg)}-{tag}.safetensors"
    )


def specialist_names(cfg: DictConfig) -> list[str]:
    return [str(d.name) for d in cfg.benchmark.specialists.values()]
