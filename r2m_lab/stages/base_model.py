"""θ₀: the shared base backbone and head initialisation, created once per base recipe and cached as a checkpoint."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from r2m_lab.backbones import create_backbone, input_config, make_head
from r2m_lab.stages.artifacts import base_path, base_recipe, command, specialist_names
from r2m_lab.stages.config_nodes import plain
from r2m_lab.stages.devices import launch_rank_is_zero, require_accelerator, wait_for_file
from r2m_lab.weights import Checkpoint, save_detector, state_dict_hash, write_card

log = logging.getLogger(__name__)


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The trainer settings that also apply to the pretext run."""
    t = cfg.trainer
    require_accelerator(t.accelerator)  # a GPU preset without a GPU: refused before the pretext trains
    return {
        "accelerator": t.accelerator,
        "devices": 1,
        "precision": t.precision,
        "enable_progress_bar": t.get("enable_progress_bar", True),
        "enable_model_summary": False,
    }


def ensure_base(cfg: DictConfig) -> Path:
    """θ₀ + the shared head initialisation, created once per base recipe and cached as a base checkpoint."""
    path = base_path(cfg)
    if path.is_file():
        return path
    if not launch_rank_is_zero():  # every rank was started at once (torchrun, srun): rank 0 alone creates θ₀
        return wait_for_file(path, "θ₀")
    bcfg = plain(cfg.backbone)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")
    if bcfg["weights"].get("hub") and offline:
        # huggingface_hub reads the variable itself: the download asked for cannot happen, only a cached copy is used
        log.warning(
            "backbone.weights.hub=true, but HF_HUB_OFFLINE=%s in the environment forbids downloads (the Makefile sets "
            "it unless it is already set): only a copy already in the Hugging Face cache can be used. "
            "Run with HF_HUB_OFFLINE=0 to download.",
            os.environ["HF_HUB_OFFLINE"],
        )
    seed_all(int(bcfg["head_seed"]))  # the random init of a pretext backbone is part of θ₀: same config, same θ₀
    backbone = create_backbone(bcfg)
    pretext = bcfg["weights"].get("pretext")
    pretext_metrics: dict[str, float] = {}
    if pretext:
        from r2m_lab.data import synthetic
        from r2m_lab.pretext import pretrain_image_id

        log.info(
            "Pretraining θ₀ for %s: image-ID pretext, %d steps (cached afterwards)", bcfg["name"], pretext["steps"]
        )
        root = synthetic.build(synthetic.SyntheticConfig(**plain(cfg.synthetic)), cfg.paths.cache_dir)
        images, class_ids, _ = synthetic.load_pretext(root)
        pretext_metrics = pretrain_image_id(
            backbone,
            images,
            class_ids,
            input_config(bcfg, backbone),
            steps=int(pretext["steps"]),
            lr=float(pretext["lr"]),
            batch_size=int(pretext["batch_size"]),
            seed=int(bcfg["head_seed"]),
            trainer_kwargs=trainer_kwargs(cfg),
        )
    head = make_head(backbone.num_features, int(bcfg["head_seed"]))
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    digest = state_dict_hash(state)
    save_detector(path, state, head.state_dict(), {"kind": "base", "base_hash": digest, "name": bcfg["name"]})
    card = {
        "kind": "base",
        "name": bcfg["name"],
        "base_hash": digest,
        "recipe": base_recipe(cfg),
        # the weight file θ₀ was converted from (path, bytes, sha256, layout), or null for a random/pretext θ₀
        "weights_source": getattr(backbone, "r2m_weights_source", None),
    }
    write_card(path, {**card, "pretext_metrics": pretext_metrics} if pretext else card)
    log.info("θ₀ for %s written to %s (hash %s)", bcfg["name"], path, digest[:12])
    return path


def require_base(cfg: DictConfig, device: str = "cpu") -> Checkpoint:
    path = base_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(
            f"θ₀ for backbone {cfg.backbone.name} (this recipe) not found at {path}. It is created by the first "
            f"fine-tune: run `{command('stage=finetune', 'data=<family>')}` for each of {specialist_names(cfg)}, "
            f"or the whole method: `{command()}`, or add train_missing=true to a merge."
        )
    return Checkpoint(path, device=device)


def seed_all(seed: int) -> None:
    L.seed_everything(seed, workers=True, verbose=False)
