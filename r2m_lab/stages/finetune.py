"""stage=finetune: one specialist (or the joint model) fine-tuned from the shared θ₀ on one data config.

A detector's path is stable (merges and tables point at it), so a file there is never replaced by a *different* one
without ``overwrite=true``: the card's training fingerprint is compared first, and a replacement is recorded in the
new card (``replaced``). The same fingerprint is reused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from r2m_lab.atomic import write_json_atomic
from r2m_lab.data.loaders import DetectionDataModule, FrameDataset, build_augment, build_transform, eval_loader
from r2m_lab.detector import score_frames
from r2m_lab.evaluation.metrics import evaluate_scores, fit_threshold
from r2m_lab.stages.artifacts import (
    command,
    output_dir,
    recipe_tag,
    specialist_path,
    specialists_dir,
    training_recipe,
)
from r2m_lab.stages.base_model import ensure_base, seed_all
from r2m_lab.stages.config_nodes import fingerprint, plain
from r2m_lab.stages.devices import (
    distributed_record,
    loader_options,
    require_accelerator,
    require_single_fit_stage,
)
from r2m_lab.stages.loggers import build_logger, close_logger
from r2m_lab.stages.models import load_detector, model_input_config
from r2m_lab.training_state import (
    AtomicCheckpointIO,
    TrainingState,
    checkpoint_callback,
    checkpoint_path,
    refuse_missing,
    resume_from,
    resume_mode,
)
from r2m_lab.weights import Checkpoint, provenance, save_detector, write_card

log = logging.getLogger(__name__)


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune a detector on ``cfg.data``; write it (safetensors + card) to its stable artifacts path."""
    joint = cfg.benchmark.get("joint")
    kind = "joint" if joint is not None and joint.name == cfg.data.name else "specialist"
    # The same fingerprint is reused (say so); overwrite=true retrains it, or replaces a different one.
    card = train_detector(cfg, cfg.data, kind=kind, reuse=not cfg.get("overwrite", False))
    if card:  # empty on the ranks other than 0 of a DDP run: rank 0 writes
        write_json_atomic(output_dir(cfg) / "metrics.json", card)
    return card


def training_record(cfg: DictConfig, data_cfg: DictConfig, base_hash: str) -> dict[str, Any]:
    """Everything a trained detector depends on (what its fingerprint hashes; kept in its card to say what changed).

    Paths under ``paths.root`` are written relative to it, so a checkout (or a copied artifacts tree) that moves
    keeps its fingerprints.
    """
    root = str(cfg.paths.root).rstrip("/")
    return {
        "base": base_hash,
        "data": _relative_to(plain(data_cfg), root),
        "recipe": plain(cfg.backbone.recipe),
        "seed": int(cfg.seed),
        "precision": str(cfg.trainer.precision),
    }


def training_fingerprint(cfg: DictConfig, data_cfg: DictConfig, base_hash: str) -> str:
    """The hash of :func:`training_record`; equal fingerprints mean the artifact can be reused."""
    return fingerprint(training_record(cfg, data_cfg, base_hash))


def _relative_to(obj: Any, root: str) -> Any:
    if isinstance(obj, dict):
        return {k: _relative_to(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative_to(v, root) for v in obj]
    if isinstance(obj, str) and root and (obj == root or obj.startswith(f"{root}/")):
        return "${paths.root}" + obj[len(root) :]
    return obj


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def record_differences(old: Any, new: Mapping[str, Any], limit: int = 6) -> list[str]:
    """``key: old → new`` for each leaf where two training records differ (the first ``limit``)."""
    if not isinstance(old, dict):
        return ["the existing card has no training record (written before fingerprints were recorded)"]
    a, b = _flatten(old), _flatten(dict(new))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
    shown = [f"{k}: {_short(a.get(k, '<absent>'))} → {_short(b.get(k, '<absent>'))}" for k in keys[:limit]]
    return shown + ([f"… and {len(keys) - limit} more"] if len(keys) > limit else [])


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def check_replacement(cfg: DictConfig, path: Path, kind: str, fp: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse to replace the detector at ``path`` by a different one unless ``overwrite=true``; return what the new
    card records about the replaced one (empty when nothing different is replaced)."""
    if not path.is_file():
        return {}
    old = Checkpoint(path).card()
    if old.get("fingerprint") == fp:
        return {}
    differences = record_differences(old.get("training"), record)
    if not cfg.get("overwrite", False):
        lines = "\n".join(f"  {d}" for d in differences)
        retrain = command("stage=finetune", f"data={record['data'].get('name', '<data>')}", "overwrite=true")
        raise FileExistsError(
            f"{path} already holds a {kind} trained differently (fingerprint {old.get('fingerprint')}, this config "
            f"gives {fp}); merges, evaluations and tables built on it would change without notice. What differs:\n"
            f"{lines}\nTo replace it (recorded in the new card), re-run with overwrite=true, e.g. {retrain}\n"
            "To keep both: give this config another paths.artifacts_dir."
        )
    log.warning("overwrite=true: replacing %s %s (fingerprint %s → %s)", kind, path, old.get("fingerprint"), fp)
    return {"fingerprint": old.get("fingerprint"), "git_commit": old.get("git_commit"), "differences": differences}


def train_detector(
    cfg: DictConfig, data_cfg: DictConfig, kind: str, reuse: bool, group: str | None = None
) -> dict[str, Any]:
    """Train on ``data_cfg`` (train split), validate on its val split, save atomically; return the card.

    With ``reuse`` an existing artifact whose card has the same training fingerprint is returned instead. Training
    checkpoints are written beside the artifact at the ``checkpoint`` config's interval and continued from per
    ``resume`` (see :mod:`r2m_lab.training_state`).
    """
    require_accelerator(cfg.trainer.accelerator)  # a GPU preset without a GPU: refused before anything else
    path = specialist_path(cfg, data_cfg.name)
    ckpt_path, mode = checkpoint_path(path), resume_mode(cfg)
    if not (reuse and path.is_file()):
        refuse_missing(ckpt_path, mode)  # resume=true with nothing to continue reads and builds nothing
    source = instantiate(data_cfg)
    # Read the data before building θ₀: a missing dataset should fail in a second, not after a pretext run.
    train_frames, val_frames = source.frames("train"), source.frames("val")
    base = Checkpoint(ensure_base(cfg))
    record = training_record(cfg, data_cfg, base.base_hash)
    fp = fingerprint(record)
    if reuse and path.is_file():
        card = Checkpoint(path).card()
        if card.get("fingerprint") == fp:
            log.info("Reusing %s %s (same fingerprint %s; overwrite=true retrains it)", kind, path, fp)
            return card
    replaced = check_replacement(cfg, path, kind, fp, record)  # before any training: a refusal costs nothing
    resume, resume_step = resume_from(ckpt_path, mode, fp, record, record_differences)
    seed_all(cfg.seed)
    recipe = cfg.backbone.recipe
    model = load_detector(cfg, base, with_optimizer=True)
    inputs = model_input_config(cfg, model)
    augment = build_augment(recipe.augment)
    # A joint model sees each family as often as its specialist does (the paper's joint training: same epochs,
    # all data).
    n_families = len(data_cfg.get("families") or [None])
    max_steps = int(recipe.max_steps) * n_families if recipe.max_steps else -1
    # With a step budget the balanced sampler draws exactly max_steps batches: one "epoch".
    max_epochs = int(recipe.max_epochs) if recipe.max_epochs else (1 if max_steps > 0 else None)
    if max_epochs is None:
        raise ValueError("Set backbone.recipe.max_steps or backbone.recipe.max_epochs: the recipe has neither")
    batch_size = int(recipe.batch_size)
    datamodule = DetectionDataModule(
        train_frames,
        val_frames,
        build_transform(inputs, augment, seed=int(cfg.seed)),
        build_transform(inputs),
        batch_size=batch_size,
        num_samples=max_steps * batch_size if max_steps > 0 else None,
        balanced=bool(recipe.balanced),
        num_workers=int(recipe.num_workers),
        seed=int(cfg.seed),
        **loader_options(cfg.trainer),
    )
    logger = build_logger(cfg, name=f"{kind}-{data_cfg.name}", group=group)
    state = TrainingState(fp, record, train_frames, str(data_cfg.name), ckpt_path)
    saver = checkpoint_callback(ckpt_path, cfg.get("checkpoint") or {})
    configured = list(instantiate(cfg.trainer.callbacks)) if cfg.trainer.get("callbacks") else []
    trainer = instantiate(
        cfg.trainer,
        max_steps=max_steps,
        max_epochs=max_epochs,
        logger=logger if logger is not None else False,
        default_root_dir=str(output_dir(cfg)),
        callbacks=[*configured, state, *([saver] if saver is not None else [])],
        # Lightning refuses a ModelCheckpoint when checkpointing is disabled; without one it writes nothing itself.
        enable_checkpointing=saver is not None,
        plugins=[AtomicCheckpointIO()],
    )
    try:
        require_single_fit_stage(str(cfg.stage.name), trainer)  # before launching anything: refusals cost nothing
    except RuntimeError:
        close_logger(logger)
        raise
    log.info(
        "Fine-tuning %s on %s: %d train frames (%d fake), %d val frames, %s steps",
        kind,
        data_cfg.name,
        len(train_frames),
        train_frames.n_fake,
        len(val_frames),
        max_steps if max_steps > 0 else f"{recipe.max_epochs} epochs of",
    )
    if resume is not None:
        log.info("Resuming %s %s from the training checkpoint %s (step %d)", kind, data_cfg.name, resume, resume_step)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    train_seconds = time.perf_counter() - start
    close_logger(logger)
    if not trainer.is_global_zero:
        return {}
    # Threshold and validation metrics: on the validation split, which is also what model selection may use.
    val_scores = score_frames(
        model,
        eval_loader(FrameDataset(val_frames, build_transform(inputs)), int(cfg.eval_batch_size)),
        device=model.device,
    )
    threshold = fit_threshold(val_scores, val_frames.labels, mode="eer")
    val_metrics = evaluate_scores(val_scores, val_frames.labels, val_frames.video_ids, threshold)
    weights = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    head = {k: v.detach().cpu() for k, v in model.head.state_dict().items()}
    save_detector(path, weights, head, {"kind": kind, "base_hash": base.base_hash, "name": str(data_cfg.name)})
    card = write_card(
        path,
        {
            "kind": kind,
            "name": str(data_cfg.name),
            "backbone": str(cfg.backbone.name),
            "base_hash": base.base_hash,
            "base_checkpoint": str(base.path),
            "base_source": provenance(base.path, "r2m_lab"),
            "weights_source": base.card().get("weights_source"),  # the file θ₀ was loaded from (null: no file)
            "data": plain(data_cfg),
            "recipe": plain(recipe),
            "seed": int(cfg.seed),
            "max_steps": max_steps,
            "distributed": distributed_record(trainer, batch_size),  # world size, strategy, devices, batch split
            "train_frames": len(train_frames),
            "train_seconds": round(train_seconds, 2),  # of this process: after a resume, from resumed_at_step on
            "resumed_at_step": resume_step if resume is not None else None,
            "threshold": threshold,
            "threshold_mode": "eer on val",
            "val_metrics": val_metrics,
            "fingerprint": fp,
            "training": record,
            "recipe_tag": recipe_tag(cfg),
            "architecture": {"model": str(cfg.backbone.model), "kwargs": plain(cfg.backbone.kwargs)},
            **({"replaced": replaced} if replaced else {}),
        },
    )
    recipe_file = specialists_dir(cfg) / "recipe.json"
    if not recipe_file.is_file():  # what the folder's tag stands for, for a reader of artifacts/
        write_json_atomic(recipe_file, {"tag": recipe_tag(cfg), **training_recipe(cfg)})
    # The detector and its card are written: the training checkpoint has nothing left that anything reads.
    ckpt_path.unlink(missing_ok=True)
    log.info("%s %s: val AUC %.3f, written to %s", kind, data_cfg.name, val_metrics["frame"]["auc"], path)
    return card
