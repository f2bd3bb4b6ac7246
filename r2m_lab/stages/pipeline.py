"""stage=pipeline: the whole method on one benchmark — θ₀, specialists, joint, every merger, every protocol, table."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from r2m_lab.mergers.task_vectors import task_vector_cosines
from r2m_lab.stages.artifacts import merged_path, output_dir, specialist_path
from r2m_lab.stages.base_model import ensure_base
from r2m_lab.stages.config_nodes import plain
from r2m_lab.stages.evaluate import evaluate_models, write_report
from r2m_lab.stages.finetune import train_detector
from r2m_lab.stages.merge import (
    SELECTION_SPLIT,
    merge_specialists,
    open_specialists,
    reference_card,
    select_and_merge,
)
from r2m_lab.stages.merger_config import REFERENCE_MERGERS, is_reference, validate_merger

log = logging.getLogger(__name__)


def pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run every step, reusing artifacts whose fingerprint matches (``stage.reuse``); return the report."""
    reuse = bool(cfg.stage.reuse)
    split = str(cfg.stage.get("select_split", SELECTION_SPLIT))
    group = output_dir(cfg).name
    timings: dict[str, float] = {}

    def timed(key: str, fn, *args, **kwargs):  # noqa: ANN001, ANN202 — a local stopwatch
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[key] = round(time.perf_counter() - start, 2)
        return value

    mergers = dict(cfg.stage.mergers)
    select = plain(cfg.stage.get("select")) or {}
    unknown = sorted(set(select) - set(mergers))
    if unknown:
        raise ValueError(
            f"stage.select has grids for mergers that are not in stage.mergers: {unknown}; drop them with "
            + " ".join(f"~stage.select.{u}" for u in unknown)
        )
    for merger_cfg in mergers.values():  # every knob checked before hours of training
        validate_merger(cfg, merger_cfg)
    timed("base", ensure_base, cfg)
    checkpoints: dict[str, Path] = {}
    for key, data_cfg in cfg.benchmark.specialists.items():
        timed(f"finetune/{key}", train_detector, cfg, data_cfg, "specialist", reuse, group)
        checkpoints[f"specialist:{key}"] = specialist_path(cfg, data_cfg.name)
    if "joint" in mergers:
        if cfg.benchmark.get("joint") is None:
            raise ValueError(f"benchmark {cfg.benchmark.name} has no joint data config; drop ~stage.mergers.joint")
        timed("finetune/joint", train_detector, cfg, cfg.benchmark.joint, "joint", reuse, group)
        checkpoints["joint"] = specialist_path(cfg, cfg.benchmark.joint.name)

    base, specialists = open_specialists(cfg)
    names, matrix = task_vector_cosines(base.backbone, {n: c.backbone for n, c in specialists.items()})
    merge_cards = {}
    for name, merger_cfg in mergers.items():
        if is_reference(merger_cfg):
            merge_cards[name] = {
                k: v for k, v in timed(f"merge/{name}", reference_card, cfg, merger_cfg).items() if k != "specialists"
            }
            continue
        if name in select:
            card = timed(f"merge/{name}", select_and_merge, cfg, merger_cfg, select[name], split, reuse)
        else:
            card = timed(f"merge/{name}", merge_specialists, cfg, merger_cfg, reuse)
        merge_cards[name] = {k: card[k] for k in ("hparams", "merge_seconds", "diagnostics", "selection") if k in card}
        checkpoints[name] = Path(card.get("checkpoint_path", merged_path(cfg, merger_cfg)))

    members = [m for m in checkpoints if m.startswith("specialist:")]
    ensemble = mergers.get("ensemble")
    # Order the rows as the paper does: specialists, joint, ensemble, then the merges.
    report = timed(
        "evaluate",
        evaluate_models,
        cfg,
        checkpoints,
        ensemble=members if ensemble is not None else (),
        reduction=str(ensemble.reduction) if ensemble is not None else "mean",
    )
    order = [*members, "joint", "ensemble", *(m for m in mergers if m not in REFERENCE_MERGERS)]
    report = report.reordered(order)
    extra = {
        "stage": "pipeline",
        "backbone": str(cfg.backbone.name),
        "seed": int(cfg.seed),
        "task_vector_cosines": {"names": names, "matrix": matrix},
        "merges": merge_cards,
        "timings_seconds": timings,
        "config": plain(cfg),
    }
    metrics = write_report(
        cfg, report, title=f"{cfg.benchmark.name}: specialists, joint training and merges", extra=extra
    )
    log.info("Timings (s): %s", timings)
    return metrics
