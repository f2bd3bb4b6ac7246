"""stage=heads: the head ablation. Which head should sit on a merged backbone?

For every merger of ``stage.mergers`` (and every row of ``stage.variants``, as in the pipeline: the plan is
:func:`~r2m_lab.stages.pipeline.plan_pipeline`'s), the specialists are merged exactly as stage=pipeline merges them:
the merger's scalar is chosen on the in-distribution validation split *with the default averaged head* (the head the
merger returns), and that one merged backbone then carries each head of ``stage.heads``:

- ``average``: the merged checkpoint as it is (the specialists' heads averaged, the merger's default);
- ``specialist:<family>`` (``specialists``: one per family): that specialist's own head, unchanged;
- ``refit``: a linear head refit on the merged backbone's frozen pooled features of the validation split only
  (:mod:`r2m_lab.evaluation.head_refit`: standardised features, logistic regression, C by video-grouped CV).

Each head other than ``average`` is saved atomically next to the merged file as
``<merged stem>-head_<variant>.safetensors`` (``specialist:swap`` → ``head_specialist-swap``) with a card saying
what it is; the backbone is the merged one, bit for bit, and θ₀'s hash is kept. Every row (the specialists, then
``<merger>/head=<variant>`` for each merger) is scored in one :func:`evaluate_models` call. The refit head's
``validation`` figures are in-sample (it was fitted on those frames); its test figures are not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from r2m_lab.data.sources import FrameSet
from r2m_lab.evaluation import head_refit
from r2m_lab.stages.artifacts import output_dir, specialist_path
from r2m_lab.stages.base_model import ensure_base
from r2m_lab.stages.config_nodes import fingerprint, plain
from r2m_lab.stages.evaluate import evaluate_models, write_report
from r2m_lab.stages.families import chosen_families, restrict_benchmark
from r2m_lab.stages.finetune import train_detector
from r2m_lab.stages.merge import (
    SELECTION_SPLIT,
    merge_specialists,
    open_specialists,
    select_and_merge,
    validation_frames,
)
from r2m_lab.stages.models import load_detector, model_input_config, resolve_device
from r2m_lab.stages.pipeline import check_benchmark_data, plan_pipeline
from r2m_lab.stages.rows import merger_row, specialist_row, theta0_entry
from r2m_lab.stages.timing import stopwatch
from r2m_lab.weights import Checkpoint, save_detector, write_card

log = logging.getLogger(__name__)

AVERAGE, SPECIALIST, REFIT = "average", "specialist", "refit"
HEAD_CHOICES = (AVERAGE, "specialists", f"{SPECIALIST}:<family>", REFIT)
REFIT_KNOBS = ("Cs", "folds")


def head_variants(cfg: DictConfig, families: Sequence[str]) -> list[str]:
    """``stage.heads`` expanded: ``average``, ``specialist:<family>`` for each family (``specialists``) or the
    ones named, ``refit``; a name that is none of these, a family the run does not merge, or a repeat is refused."""
    value = plain(cfg.stage.get("heads"))
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"stage.heads must be a non-empty list from {list(HEAD_CHOICES)}, got {value!r}")
    out: list[str] = []
    for name in map(str, value):
        if name == "specialists":
            out += [f"{SPECIALIST}:{f}" for f in families]
        elif name in (AVERAGE, REFIT) or (name.startswith(f"{SPECIALIST}:") and name.split(":", 1)[1] in families):
            out.append(name)
        else:
            raise ValueError(
                f"stage.heads names {name!r}, which is not a head; the choices are {list(HEAD_CHOICES)} with "
                f"<family> one of the merged families {list(families)}"
            )
    repeated = sorted({v for v in out if out.count(v) > 1})
    if repeated:
        raise ValueError(f"stage.heads lists {repeated} twice (`specialists` already holds every specialist:<family>)")
    return out


def refit_knobs(cfg: DictConfig) -> dict[str, Any]:
    """``stage.refit`` (``Cs``: the C grid, ``folds``: CV folds), checked before any work."""
    knobs = plain(cfg.stage.get("refit")) or {}
    unknown = sorted(set(knobs) - set(REFIT_KNOBS))
    if unknown:
        raise ValueError(f"stage.refit has unknown knobs {unknown}; it has {list(REFIT_KNOBS)}")
    cs = knobs.get("Cs", list(head_refit.DEFAULT_CS))
    if isinstance(cs, str) or not isinstance(cs, Sequence) or not cs:
        raise ValueError(f"stage.refit.Cs must be a non-empty list of positive numbers, got {cs!r}")
    try:
        cs = [float(c) for c in cs]
    except (TypeError, ValueError) as err:
        raise ValueError(f"stage.refit.Cs must be a list of positive numbers, got {cs!r}") from err
    if any(not c > 0 for c in cs):
        raise ValueError(f"stage.refit.Cs must hold positive numbers, got {cs}")
    folds = knobs.get("folds", 5)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"stage.refit.folds must be an integer >= 2, got {folds!r}")
    return {"Cs": cs, "folds": folds}


def refit_frames(cfg: DictConfig) -> FrameSet:
    """The pooled in-distribution validation frames the refit sees, refused (naming each set) if one class only."""
    val = validation_frames(cfg)
    if val.n_fake == 0 or val.n_real == 0:
        counts = {}
        for data_cfg in cfg.benchmark.validation.values():
            frames = instantiate(data_cfg).frames(SELECTION_SPLIT)
            counts[str(data_cfg.name)] = {"real": frames.n_real, "fake": frames.n_fake}
        raise ValueError(
            f"the validation split of benchmark {cfg.benchmark.name} holds one class only ({counts}): a head "
            "cannot be refit on it; give benchmark.validation sets with both real and fake videos, or drop the "
            "refit with stage.heads=[average,specialists]"
        )
    return val


def variant_path(merged: Path, variant: str) -> Path:
    """``<merged stem>-head_<variant>.safetensors`` beside the merged file (``:`` spelled ``-``)."""
    return merged.with_name(f"{merged.stem}-head_{variant.replace(':', '-')}.safetensors")


def save_head_variant(
    cfg: DictConfig,
    merge_card: Mapping[str, Any],
    variant: str,
    head: Mapping[str, torch.Tensor],
    about: Mapping[str, Any],
) -> dict[str, Any]:
    """The merged backbone with ``head``, saved atomically beside the merged file with its card; return the card.

    ``about`` goes into the card (``head_source``, ``head_key``, ``refit``...).
    """
    merged = Checkpoint(merge_card["checkpoint_path"])
    path = variant_path(merged.path, variant)
    name = f"{merge_card.get('name', merged.path.stem)}-head_{variant.replace(':', '-')}"
    save_detector(path, merged.backbone, head, {"kind": "merged", "base_hash": merged.base_hash, "name": name})
    return write_card(
        path,
        {
            "kind": "merged",
            "name": name,
            "merger": merge_card.get("merger"),
            "head": variant,
            "merged_checkpoint": str(merged.path),
            "hparams": merge_card.get("hparams"),
            # the merger's scalar was chosen on validation with the averaged head, not with this one
            "selection": merge_card.get("selection"),
            "backbone": str(cfg.backbone.name),
            "benchmark": str(cfg.benchmark.name),
            "base_hash": merged.base_hash,
            "seed": int(cfg.seed),
            **about,
            "checkpoint_path": str(path),
        },
    )


def _reusable(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    card = Checkpoint(path).card()
    return card if card.get("head_key") == dict(key) else None


def head_checkpoint(
    cfg: DictConfig,
    merge_card: Mapping[str, Any],
    variant: str,
    specialists: Mapping[str, Checkpoint],
    refit: Mapping[str, Any] | None,
    reuse: bool,
) -> tuple[Path, dict[str, Any] | None]:
    """(checkpoint path, refit facts or None) of one head on one merged backbone; made unless ``reuse`` finds it.

    ``specialists``: family key → the specialist's checkpoint. A saved variant is reused only when its card's
    ``head_key`` matches: the merged file's mtime, the head's source and (refit) the knobs and validation sets.
    """
    merged = Path(merge_card["checkpoint_path"])
    if variant == AVERAGE:
        return merged, None
    path = variant_path(merged, variant)
    key: dict[str, Any] = {"merged_mtime_ns": merged.stat().st_mtime_ns, "variant": variant}
    if variant.startswith(f"{SPECIALIST}:"):
        source = specialists[variant.split(":", 1)[1]]
        key["specialist_mtime_ns"] = source.path.stat().st_mtime_ns
        if reuse and _reusable(path, key) is not None:
            return path, None
        about = {"head_source": f"the specialist's own head: {source.path}", "head_key": key}
        save_head_variant(cfg, merge_card, variant, source.head, about)
        return path, None
    key.update({"refit": dict(refit or {}), "validation": fingerprint(plain(cfg.benchmark.validation))})
    if reuse and (card := _reusable(path, key)) is not None:
        log.info("Reusing the refit head %s", path)
        return path, card["refit"]
    frames = refit_frames(cfg)
    device = resolve_device(cfg)
    model = load_detector(cfg, Checkpoint(merged))
    head, facts = head_refit.refit_head(
        model.backbone,
        frames,
        model_input_config(cfg, model),
        int(cfg.eval_batch_size),
        device,
        cs=refit["Cs"],
        folds=int(refit["folds"]),
        seed=int(cfg.seed),
    )
    facts["sets"] = [str(d.name) for d in cfg.benchmark.validation.values()]
    facts["split"] = SELECTION_SPLIT
    del model
    about = {
        "head_source": "logistic regression on the merged backbone's pooled validation features",
        "head_key": key,
        "refit": facts,
    }
    save_head_variant(cfg, merge_card, variant, head, about)
    log.info(
        "refit head on %s: C=%g (CV AUC %.4f over %d folds, %d frames)",
        merged.name,
        facts["C"],
        facts["cv_auc"],
        facts["folds"],
        facts["frames"],
    )
    return path, facts


def heads(cfg: DictConfig) -> dict[str, Any]:
    """Merge as the pipeline does, put each head of ``stage.heads`` on every merged backbone, evaluate all rows
    (and the specialists) in one pass; write the report into the run folder and return its metrics.json payload."""
    reuse = bool(cfg.stage.reuse)
    split = str(cfg.stage.get("select_split", SELECTION_SPLIT))
    group = output_dir(cfg).name
    timings: dict[str, float] = {}
    timed = stopwatch(timings)

    families = chosen_families(cfg, plain(cfg.stage.get("families", "all")))
    cfg = restrict_benchmark(cfg, families)
    variants = head_variants(cfg, families)  # bad names fail before any work
    knobs = refit_knobs(cfg)  # checked even when no refit runs: a typo is never ignored
    refit = knobs if REFIT in variants else None
    plan = plan_pipeline(cfg)
    if plan.reference_rows:
        raise ValueError(
            f"stage=heads compares heads on merged backbones; the reference rows {plan.reference_rows} are "
            "stage=pipeline's: drop stage.reference_rows"
        )
    check_benchmark_data(cfg, plan)
    if refit is not None:
        refit_frames(cfg)  # a one-class validation split is refused before any training
    timed("base", ensure_base, cfg)
    checkpoints: dict[str, Path] = {}
    for key, data_cfg in cfg.benchmark.specialists.items():
        timed(f"finetune/{key}", train_detector, cfg, data_cfg, "specialist", reuse, group)
        checkpoints[f"specialist:{key}"] = specialist_path(cfg, data_cfg.name)
    base, opened = open_specialists(cfg)
    by_family = {key: opened[str(d.name)] for key, d in cfg.benchmark.specialists.items()}

    rows = {f"specialist:{key}": specialist_row(key) for key in families}
    merge_cards: dict[str, dict[str, Any]] = {}
    refits: dict[str, dict[str, Any]] = {}
    for label, merger_cfg in plan.mergers.items():
        if label in plan.grids:
            card = timed(
                f"merge/{label}", select_and_merge, cfg, merger_cfg, plan.grids[label], split, reuse, label=label
            )
        else:
            card = timed(f"merge/{label}", merge_specialists, cfg, merger_cfg, reuse)
        merge_cards[label] = {
            k: card[k] for k in ("checkpoint_path", "hparams", "merge_seconds", "selection") if k in card
        }
        for variant in variants:
            row = f"{label}/head={variant}"
            path, facts = timed(f"heads/{row}", head_checkpoint, cfg, card, variant, by_family, refit, reuse)
            checkpoints[row] = path
            rows[row] = merger_row(
                card, families, variant=label if label in plan.variants else None, head=variant, base_row=label
            )
            if facts is not None:
                refits[row] = facts

    report = timed("evaluate", evaluate_models, cfg, checkpoints)
    report = report.reordered(list(checkpoints))  # specialists, then each merger's heads in stage.heads order
    extra = {
        "stage": "heads",  # the report's own keys already hold "benchmark"
        "backbone": str(cfg.backbone.name),
        "seed": int(cfg.seed),
        "theta0": theta0_entry(base),
        "families": families,
        "heads": variants,
        "rows": {label: rows[label] for label in report.models},
        "merges": merge_cards,
        "refits": refits,
        "timings_seconds": timings,
        "config": plain(cfg),
    }
    metrics = write_report(cfg, report, title=f"{cfg.benchmark.name}: heads on merged backbones", extra=extra)
    log.info("Timings (s): %s", timings)
    return metrics
