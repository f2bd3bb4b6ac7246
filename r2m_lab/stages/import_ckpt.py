"""stage=import: released detector checkpoints (DF40's per-family CLIP detectors, any DeepfakeBench CLIP detector)
become r2m_lab specialists, so ``stage=merge`` merges them like trained ones.

``stage.checkpoints`` maps a data name of the benchmark to a checkpoint file; ``backbone.weights.path`` is θ₀, the
CLIP they were fine-tuned from (e.g. Hugging Face's openai/clip-vit-large-patch14 for DF40). θ₀ is written as the
base checkpoint (what ``stage=merge`` checks every specialist's θ₀ hash against), each detector's backbone is
converted to timm keys and checked key by key against the configured backbone, and its head (DeepfakeBench's
``nn.Linear(D, 2)``, logit 1 = fake, as r2m_lab's) is taken as it is. Each specialist's card records the source file's
sha256 and layout. The module is not called ``import`` because Python cannot import a module of that name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from r2m_lab.atomic import write_json_atomic
from r2m_lab.backbones import create_backbone
from r2m_lab.layouts import DETECTOR_LAYOUTS, LAYOUTS, check, convert, file_layout, read_state_dict
from r2m_lab.stages.artifacts import output_dir, specialist_names, specialist_path
from r2m_lab.stages.base_model import ensure_base
from r2m_lab.stages.config_nodes import plain
from r2m_lab.weights import Checkpoint, provenance, save_detector, write_card

log = logging.getLogger(__name__)

# ‖θᵢ − θ₀‖ / ‖θ₀‖ above this says the detector was probably not fine-tuned from this θ₀ (DF40's recipe, Adam at
# 1e-5 for a few epochs, moves a CLIP by a few percent; another CLIP release is ~100 % away). A warning, not a refusal:
# long fine-tunes move further.
FAR_FROM_BASE = 0.5


def import_checkpoints(cfg: DictConfig) -> dict[str, Any]:
    """Import every ``stage.checkpoints`` entry as a specialist of θ₀ = ``backbone.weights.path``; return a summary.

    A specialist already imported from the same file onto the same θ₀ is kept; any other file at a specialist's path
    (e.g. a trained one) is only replaced with ``stage.overwrite=true``.
    """
    checkpoints = {str(k): Path(str(v)).expanduser() for k, v in (plain(cfg.stage.get("checkpoints")) or {}).items()}
    if not checkpoints:
        raise ValueError(
            "stage.checkpoints is empty: map each family to its detector checkpoint, e.g. "
            "'stage.checkpoints={df40_fs_ff:/ckpt/fs/ckpt_best.pth,df40_fr_ff:/ckpt/fr/ckpt_best.pth}'"
        )
    if not cfg.backbone.weights.get("path"):
        raise ValueError(
            "stage=import needs θ₀, the CLIP the detectors were fine-tuned from: set backbone.weights.path (for DF40's "
            "CLIP detectors, openai/clip-vit-large-patch14's model.safetensors with backbone=clip_vit_l14)"
        )
    known = specialist_names(cfg)
    unknown = sorted(set(checkpoints) - set(known))
    if unknown:
        raise ValueError(
            f"stage.checkpoints names {unknown}, which are not specialists of benchmark={cfg.benchmark.name} "
            f"({known}); stage=merge looks for exactly those names (choose the benchmark they belong to)"
        )
    absent = {n: str(p) for n, p in checkpoints.items() if not p.is_file()}
    if absent:
        raise FileNotFoundError(f"detector checkpoint(s) not found: {absent}")
    overwrite = bool(cfg.stage.get("overwrite", False))

    base = Checkpoint(ensure_base(cfg))  # θ₀ from backbone.weights.path, loaded exactly (or refused) by layouts
    base_file = Path(str(cfg.backbone.weights.path)).expanduser()
    base_source = provenance(base_file, file_layout(base_file))
    expected = create_backbone(plain(cfg.backbone), load_weights=False).state_dict()
    theta0 = base.backbone_state()
    imported: dict[str, Any] = {}
    for name, file in checkpoints.items():
        imported[name] = _import_one(cfg, name, file, base, base_source, expected, theta0, overwrite)
    summary = {
        "stage": "import",
        "backbone": str(cfg.backbone.name),
        "base_checkpoint": str(base.path),
        "base_hash": base.base_hash,
        "base_source": base_source,
        "specialists": imported,
    }
    write_json_atomic(output_dir(cfg) / "metrics.json", summary)
    missing = [n for n in known if not specialist_path(cfg, n).is_file()]
    if missing:
        log.info("Specialists still missing before stage=merge can run: %s", missing)
    return summary


def _import_one(
    cfg: DictConfig,
    name: str,
    file: Path,
    base: Checkpoint,
    base_source: dict[str, Any],
    expected: dict[str, torch.Tensor],
    theta0: dict[str, torch.Tensor],
    overwrite: bool,
) -> dict[str, Any]:
    path = specialist_path(cfg, name)
    state, wrapper = read_state_dict(file)
    converted = convert(state)
    converted.wrapper = wrapper
    if converted.layout not in DETECTOR_LAYOUTS:
        raise ValueError(
            f"{file} is a {LAYOUTS[converted.layout]} file, a backbone without a real/fake head: stage=import takes "
            f"detector checkpoints ({', '.join(LAYOUTS[k] for k in DETECTOR_LAYOUTS)})"
        )
    check(converted, expected, f"{file} for specialist {name} of backbone={cfg.backbone.name}")
    width = expected["cls_token"].shape[-1]
    head_shapes = {k: tuple(v.shape) for k, v in converted.head.items()}
    if head_shapes != {"weight": (2, width), "bias": (2,)}:
        raise ValueError(
            f"{file}: the head must be a Linear({width}, 2) (head.weight (2, {width}), head.bias (2,)) scoring "
            f"[real, fake]; found {head_shapes or 'no head'}"
        )
    source = provenance(file, converted.layout, prefix=converted.prefix, wrapper=converted.wrapper)
    if path.is_file() and not overwrite:
        card = Checkpoint(path).card()
        if card.get("source", {}).get("sha256") == source["sha256"] and card.get("base_hash") == base.base_hash:
            log.info("%s: already imported from %s onto this θ₀ (%s), kept", name, file, path)
            return {"checkpoint": str(path), "source": source, "reused": True}
        raise FileExistsError(
            f"{path} exists and was not imported from {file} onto this θ₀ (its card: kind={card.get('kind')}, "
            f"source={card.get('source', {}).get('path', 'trained here')}). Set stage.overwrite=true to replace it."
        )
    backbone = {k: v.to(expected[k].dtype) for k, v in converted.tensors.items()}  # fp16 releases → θ₀'s dtype
    head = {k: v.to(torch.float32) for k, v in converted.head.items()}
    distance = _relative_distance(backbone, theta0)
    if distance > FAR_FROM_BASE:
        log.warning(
            "%s: ‖θ − θ₀‖/‖θ₀‖ = %.2f; was %s really fine-tuned from θ₀ %s? Merging needs their true θ₀.",
            name,
            distance,
            file,
            base_source["path"],
        )
    save_detector(path, backbone, head, {"kind": "specialist", "base_hash": base.base_hash, "name": name})
    write_card(
        path,
        {
            "kind": "specialist",
            "name": name,
            "imported": True,
            "backbone": str(cfg.backbone.name),
            "base_hash": base.base_hash,
            "base_checkpoint": str(base.path),
            "base_source": base_source,
            "source": {**source, "extras_ignored": converted.describe()["extras_ignored"]},
            "relative_distance_to_base": distance,
            # DeepfakeBench decides by argmax of the two logits, i.e. P(fake) > 0.5; nothing was fitted here.
            "threshold": 0.5,
            "threshold_mode": "argmax (the source's decision rule; not fitted on r2m_lab's validation split)",
        },
    )
    log.info("%s: imported %s (%s) → %s (‖θ − θ₀‖/‖θ₀‖ = %.4f)", name, file, converted.layout, path, distance)
    return {"checkpoint": str(path), "source": source, "relative_distance_to_base": distance, "reused": False}


def _relative_distance(state: dict[str, torch.Tensor], theta0: dict[str, torch.Tensor]) -> float:
    """‖θ − θ₀‖ / ‖θ₀‖ over all backbone tensors (float64 sums: a ViT-L has 3·10⁸ terms)."""
    diff = sum(float((state[k].double() - theta0[k].double()).square().sum()) for k in theta0)
    norm = sum(float(theta0[k].double().square().sum()) for k in theta0)
    return (diff / norm) ** 0.5 if norm else float("inf")
