"""stage=merge: merge the benchmark's specialists with the configured merger, streaming from their safetensors."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from r2m_lab.atomic import write_json_atomic
from r2m_lab.stages.common import (
    merged_path,
    merger_hparams,
    merger_name,
    output_dir,
    plain,
    require_base,
    specialist_names,
    specialist_path,
)
from r2m_lab.weights import Checkpoint, save_detector, write_card

log = logging.getLogger(__name__)


def merge(cfg: DictConfig) -> dict[str, Any]:
    """Merge with ``cfg.merger``; write the merged detector + card to its stable path and the diagnostics here."""
    card = merge_specialists(cfg, cfg.merger)
    write_json_atomic(output_dir(cfg) / "metrics.json", card)
    return card


def open_specialists(cfg: DictConfig) -> tuple[Checkpoint, dict[str, Checkpoint]]:
    """θ₀ and the benchmark's specialists, refused unless every specialist descends from this θ₀."""
    names = specialist_names(cfg)
    missing = [n for n in names if not specialist_path(cfg, n).is_file()]
    if missing:
        commands = "\n".join(f"  python -m r2m_lab stage=finetune data={n} seed={cfg.seed}" for n in missing)
        raise FileNotFoundError(
            f"{len(missing)} specialist(s) of benchmark {cfg.benchmark.name} were never trained for backbone "
            f"{cfg.backbone.name}, seed {cfg.seed} (looked in {specialist_path(cfg, missing[0]).parent}). "
            f"Train them first:\n{commands}"
        )
    base = require_base(cfg)
    specialists = {n: Checkpoint(specialist_path(cfg, n)) for n in names}
    foreign = {n: c.base_hash[:12] or "none" for n, c in specialists.items() if c.base_hash != base.base_hash}
    if foreign:
        raise ValueError(
            f"Specialists {sorted(foreign)} were not fine-tuned from this θ₀ ({base.path.name}, hash "
            f"{base.base_hash[:12]}); their θ₀ hashes: {foreign}. Merging needs one shared θ₀: re-run "
            "stage=finetune for them with the current backbone config."
        )
    return base, specialists


def merge_specialists(cfg: DictConfig, merger_cfg: Mapping[str, Any], reuse: bool = False) -> dict[str, Any]:
    """Run one merger over the benchmark's specialists; return the merged detector's card."""
    path = merged_path(cfg, merger_cfg)
    name = merger_name(merger_cfg)
    merge_fn = instantiate(merger_cfg)  # validates the hyper-parameters' names before any work
    base, specialists = open_specialists(cfg)
    sources = {n: {"path": str(c.path), "hash_of_base": c.base_hash} for n, c in specialists.items()}
    if reuse and path.is_file():
        card = Checkpoint(path).card()
        if card.get("specialist_mtimes") == _mtimes(specialists):
            log.info("Reusing merged model %s", path)
            return card
    start = time.perf_counter()
    result = merge_fn(
        base.backbone, {n: c.backbone for n, c in specialists.items()}, {n: c.head for n, c in specialists.items()}
    )
    seconds = time.perf_counter() - start
    save_detector(path, result.backbone, result.head, {"kind": "merged", "base_hash": base.base_hash, "name": name})
    card = write_card(
        path,
        {
            "kind": "merged",
            "name": name,
            "merger": name,
            "hparams": merger_hparams(merger_cfg),
            "backbone": str(cfg.backbone.name),
            "benchmark": str(cfg.benchmark.name),
            "base_hash": base.base_hash,
            "base_checkpoint": str(base.path),
            "specialists": sources,
            "specialist_mtimes": _mtimes(specialists),
            "seed": int(cfg.seed),
            "merge_seconds": round(seconds, 3),
            "diagnostics": plain(result.diagnostics),
        },
    )
    log.info("Merged %d specialists with %s in %.2f s → %s", len(specialists), name, seconds, path)
    return card


def _mtimes(specialists: Mapping[str, Checkpoint]) -> dict[str, float]:
    # A re-trained specialist invalidates every merge made from its predecessor.
    return {n: Path(c.path).stat().st_mtime for n, c in specialists.items()}
