"""Where artifacts live: stable paths under ``paths.artifacts_dir`` (θ₀, specialists, merges) and the run folder.

Paths are a function of the config alone, so a later stage (merge, evaluate, predict) finds what an earlier one wrote.
Every path carries a tag of what makes its weights differ, so two configs that train different weights (``debug=smoke``
against the real recipe, another backbone size, another optimiser) never share a file:

- θ₀: ``base/<backbone>-<fingerprint of the θ₀ recipe>.safetensors``
- specialists and the joint model: ``specialists/<backbone>-<recipe tag>/seed<seed>/<data>.safetensors``
- merges: ``merged/<backbone>-<recipe tag>/<benchmark>/seed<seed>/<merger>-<hash>.safetensors``

The recipe tag (:func:`recipe_tag`) hashes θ₀'s recipe, the fine-tuning recipe and the precision; ``recipe.json`` in
the tagged folder spells out what it stands for. What the tag leaves out (the data config behind a name) is checked
against the full training fingerprint in each card before a file is replaced (see ``stages/finetune.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from r2m_lab.stages.config_nodes import fingerprint, plain
from r2m_lab.stages.merger_config import merger_hparams, merger_name
from r2m_lab.weights import file_sha256

# Overrides that choose what a command does rather than what the artifacts it needs are made of: left out when an
# error message suggests the command that creates a missing artifact.
_NOT_RECIPE = (
    "stage",
    "data",
    "merger",
    "rank_ratio",
    "device",
    "eval_batch_size",
    "logger",
    "hydra",
    "paths.output_dir",
    "overwrite",
    "train_missing",
    "resume",
    "checkpoint",
)


def output_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def artifacts_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.artifacts_dir)


def base_recipe(cfg: DictConfig) -> dict[str, Any]:
    """What θ₀ depends on: the architecture, its weights (the file's bytes, not only its path: another file at the
    same path is another θ₀), the head seed and (for a pretext) the pretext data."""
    b = plain(cfg.backbone)
    recipe = {k: b.get(k) for k in ("name", "model", "kwargs", "weights", "head_seed")}
    weights_file = (b.get("weights") or {}).get("path")
    if weights_file and Path(weights_file).expanduser().is_file():
        recipe["weights_sha256"] = file_sha256(weights_file)
    if b["weights"].get("pretext"):
        recipe["pretext_data"] = plain(cfg.synthetic)
    return recipe


def base_path(cfg: DictConfig) -> Path:
    return artifacts_dir(cfg) / "base" / f"{cfg.backbone.name}-{fingerprint(base_recipe(cfg))}.safetensors"


def training_recipe(cfg: DictConfig) -> dict[str, Any]:
    """What every detector fine-tuned under ``cfg`` shares: θ₀'s recipe, the fine-tuning recipe and the precision."""
    return {
        "base": base_recipe(cfg),
        "recipe": plain(cfg.backbone.recipe),
        "precision": str(cfg.trainer.precision),
    }


def recipe_tag(cfg: DictConfig) -> str:
    """``<backbone>-<8 hex>``: the folder name of everything fine-tuned (and merged) under this training recipe."""
    return f"{cfg.backbone.name}-{fingerprint(training_recipe(cfg), 8)}"


def specialists_dir(cfg: DictConfig) -> Path:
    """The folder of this recipe's fine-tuned detectors (``recipe.json`` and one ``seed<seed>/`` folder per seed)."""
    return artifacts_dir(cfg) / "specialists" / recipe_tag(cfg)


def specialist_path(cfg: DictConfig, data_name: str) -> Path:
    return specialists_dir(cfg) / f"seed{cfg.seed}" / f"{data_name}.safetensors"


def merged_path(cfg: DictConfig, merger_cfg: Mapping[str, Any]) -> Path:
    tag = fingerprint({"merger": merger_hparams(merger_cfg), "specialists": specialist_names(cfg)}, 8)
    return (
        artifacts_dir(cfg)
        / "merged"
        / recipe_tag(cfg)
        / cfg.benchmark.name
        / f"seed{cfg.seed}"
        / f"{merger_name(merger_cfg)}-{tag}.safetensors"
    )


def specialist_names(cfg: DictConfig) -> list[str]:
    return [str(d.name) for d in cfg.benchmark.specialists.values()]


def recipe_overrides() -> list[str]:
    """The command-line overrides of this run that shape its artifacts (``debug=smoke``, ``backbone=...``,
    ``seed=...``, ``paths.root=...``), so an error can suggest a command that creates the artifact *this* config
    looks for. Empty outside a Hydra run (a config composed in Python has no command line)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    kept = []
    for override in (str(o) for o in HydraConfig.get().overrides.task):
        key = override.lstrip("+~").split("=", 1)[0]
        if not any(key == k or key.startswith(f"{k}.") for k in _NOT_RECIPE):
            kept.append(override)
    return kept


def command(*args: str) -> str:
    """``python -m r2m_lab <args> <this run's recipe overrides>``: a command to paste, for error messages."""
    return " ".join(["python -m r2m_lab", *args, *recipe_overrides()])
