"""Specialist screening before a merge (``stage.screen``): flag a specialist whose task vector or head is an outlier.

Merging strangers' checkpoints is how a poisoned or broken one gets in (labels flipped, a task vector scaled 10×);
:func:`r2m_lab.screening.screen_specialists` measures each against the others in one streaming pass. ``warn`` (the
default) logs the flagged names and records the report; ``refuse`` stops before any merge; ``off`` skips the pass.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from r2m_lab.atomic import write_json_atomic, write_text_atomic
from r2m_lab.screening import screen_specialists
from r2m_lab.stages.artifacts import output_dir
from r2m_lab.stages.config_nodes import plain
from r2m_lab.weights import Checkpoint

log = logging.getLogger(__name__)

SCREEN_MODES = ("warn", "refuse", "off")


def screen_mode(cfg: DictConfig) -> str:
    """``stage.screen``, checked: a config error fails before any checkpoint is read."""
    mode = str(cfg.stage.get("screen", "warn"))
    if mode not in SCREEN_MODES:
        raise ValueError(f"stage.screen must be one of {', '.join(SCREEN_MODES)}; got {mode!r}")
    return mode


def screen(cfg: DictConfig, base: Checkpoint, specialists: Mapping[str, Checkpoint]) -> dict[str, Any] | None:
    """Screen the specialists of this merge as ``stage.screen`` says; write ``screening.{json,md}`` into the run folder
    and return the report as a dict (``None`` when off). ``stage.screen_thresholds`` overrides the thresholds of
    :func:`~r2m_lab.screening.screen_specialists` by name."""
    mode = screen_mode(cfg)
    if mode == "off":
        return None
    thresholds = plain(cfg.stage.get("screen_thresholds")) or {}
    report = screen_specialists(
        base.backbone,
        {n: c.backbone for n, c in specialists.items()},
        {n: c.head for n, c in specialists.items()},
        base_head=base.head,
        **thresholds,
    )
    out = output_dir(cfg)
    result = report.to_dict()
    write_json_atomic(out / "screening.json", result)
    write_text_atomic(out / "screening.md", report.format() + "\n")
    if report.flags:
        reasons = "\n".join(f"  {f.family}: {f.statistic} = {f.value:.4g} ({f.reason})" for f in report.flags)
        message = (
            f"Screening flagged specialist(s) {report.flagged} as outliers among {report.families}:\n{reasons}\n"
            f"(report: {out / 'screening.md'})"
        )
        if mode == "refuse":
            raise ValueError(
                f"{message}\nNot merging (stage.screen=refuse). Inspect or retrain them, or merge anyway with "
                "stage.screen=warn."
            )
        log.warning("%s\nMerging anyway (stage.screen=warn; stage.screen=refuse stops here).", message)
    else:
        log.info("Screening: no outlier among %s", report.families)
    return result
