"""What several stages share: artifact paths, fingerprints, θ₀ creation, loggers, trainers, model loading."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from r2m_lab.backbones import create_backbone, input_config, make_head
from r2m_lab.detector import Detector
from r2m_lab.weights import Checkpoint, save_detector, state_dict_hash, write_card

log = logging.getLogger(__name__)


def plain(node: Any) -> Any:
    """A resolved, plain-Python copy of a config node (dicts/lists), or the value itself."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def fingerprint(obj: Any, length: int = 10) -> str:
    """A short stable hash of a JSON-able object (config nodes are resolved first)."""
    text = json.dumps(plain(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def output_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.paths.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def artifacts_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.artifacts_dir)


def resolve_device(cfg: DictConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def merger_name(merger_cfg: Mapping[str, Any]) -> str:
    """``r2m_lab.mergers.r2m.merge`` → ``r2m``: the merger's name is its module, so no second registry is needed."""
    return str(merger_cfg["_target_"]).split(".")[-2]


def merger_hparams(merger_cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in plain(merger_cfg).items() if not k.startswith("_")}


# Reference rows that are configured like mergers but combine nothing in weight space (conf/merger/{ensemble,joint}):
# the stages score the specialists (ensemble) or the jointly trained detector (joint) instead of a merged checkpoint.
REFERENCE_MERGERS = ("ensemble", "joint")


def is_reference(merger_cfg: Mapping[str, Any]) -> bool:
    return merger_name(merger_cfg) in REFERENCE_MERGERS


def validate_merger(cfg: DictConfig, merger_cfg: Mapping[str, Any]) -> None:
    """Run the merger module's ``validate`` on the configured hyper-parameters: bad knobs fail before any work.

    ``n_tasks`` (the benchmark's number of specialists) is passed to validators that take it (R²M's k ≤ N).
    """
    module = importlib.import_module(str(merger_cfg["_target_"]).rsplit(".", 1)[0])
    validate = getattr(module, "validate", None)
    if validate is None:
        raise ValueError(f"merger module {module.__name__} has no validate(): every merger checks its knobs")
    hparams = merger_hparams(merger_cfg)
    if "n_tasks" in inspect.signature(validate).parameters:
        hparams["n_tasks"] = len(specialist_names(cfg))
    try:
        validate(**hparams)
    except TypeError as err:  # an unknown knob name (a typo in an override)
        raise ValueError(f"merger={merger_name(merger_cfg)}: {err}") from err


# ---------------------------------------------------------------------------------------------------- artifact paths
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


# ---------------------------------------------------------------------------------------------------- θ₀
def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The trainer settings that also apply to the pretext run."""
    t = cfg.trainer
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
    bcfg = plain(cfg.backbone)
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
    card = {"kind": "base", "name": bcfg["name"], "base_hash": digest, "recipe": base_recipe(cfg)}
    write_card(path, {**card, "pretext_metrics": pretext_metrics} if pretext else card)
    log.info("θ₀ for %s written to %s (hash %s)", bcfg["name"], path, digest[:12])
    return path


def require_base(cfg: DictConfig, device: str = "cpu") -> Checkpoint:
    path = base_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(
            f"θ₀ for backbone {cfg.backbone.name} not found at {path}. It is created by the first fine-tune: run "
            f"`python -m r2m_lab stage=finetune data=<family>` for each of {specialist_names(cfg)} "
            "(or `python -m r2m_lab stage=pipeline`)."
        )
    return Checkpoint(path, device=device)


# ---------------------------------------------------------------------------------------------------- models
def build_detector(cfg: DictConfig, checkpoint: Checkpoint, with_optimizer: bool = False) -> Detector:
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


def input_cfg(cfg: DictConfig, model: Detector) -> dict[str, Any]:
    return input_config(plain(cfg.backbone), model.backbone)


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


def seed_all(seed: int) -> None:
    L.seed_everything(seed, workers=True, verbose=False)
