"""A merger's config node in a run: its name, its knobs, and the merger it builds, checked before any checkpoint
is read. The contract itself (`Merger`, the YAML layout, discovery) is in `r2m_lab.mergers`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from r2m_lab.mergers import Merger, build_merger, merger_hparams, merger_name

__all__ = ["build_run_merger", "merger_hparams", "merger_name", "n_specialists", "validate_merger"]


def n_specialists(cfg: DictConfig) -> int:
    """N: the number of specialists the benchmark merges."""
    return len(cfg.benchmark.specialists)


def build_run_merger(cfg: DictConfig, merger_cfg: Mapping[str, Any]) -> Merger:
    """The configured merger, its knobs checked with N = the benchmark's number of specialists (R²M's k ≤ N)."""
    return build_merger(merger_cfg, n_tasks=n_specialists(cfg))


def validate_merger(cfg: DictConfig, merger_cfg: Mapping[str, Any]) -> None:
    """Refuse bad knobs (unknown, missing, out of range, k > N) with a ValueError, before any work."""
    build_run_merger(cfg, merger_cfg)
