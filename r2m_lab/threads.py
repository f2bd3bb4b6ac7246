"""The ``threads`` knob: how many CPU threads torch uses in this process, set once when a stage starts.

Tiny models on a few cores run faster on one thread: each matrix of the tiny ViT is (4160, 96) × (96, 288) for a
training batch, too small for two OpenMP threads to share without their hand-offs costing more than the work, and on
a machine whose cores are also busy with other processes the waiting threads spin against them (measured on a
shared 2-core box: one thread ran a training step several times faster than two). Large models (CLIP ViT-L merges on
CPU, real benchmarks) want every core, which is torch's own default. So the choice is per backbone:
``conf/config.yaml`` sets ``threads: ${oc.select:backbone.threads,auto}``, ``backbone=tiny`` says 1, the others say
nothing (auto).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

AUTO = "auto"


def parse_threads(value: Any) -> int | None:
    """``auto`` → None (torch's default: one thread per core); a positive integer → itself; anything else refused."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    if isinstance(value, bool):
        raise ValueError(f"threads must be `auto` or a positive integer, got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"threads must be `auto` or a positive integer, got {value!r}") from None
    if n < 1 or n != float(value):
        raise ValueError(f"threads must be `auto` or a positive integer, got {value!r}")
    return n


def apply_threads(value: Any) -> int:
    """Set torch's intra-op thread count from the ``threads`` knob; return the count in effect.

    ``auto`` leaves torch's default untouched. Called once at stage start (``r2m_lab.__main__``), before any tensor
    work, so every phase of the stage (training, merging, scoring) runs with the same count; the count can change
    float reductions, so it is part of what a result depends on (metrics.json records it).
    """
    n = parse_threads(value)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
        log.info("threads=%d: torch uses %d CPU thread(s) in this process", n, n)
    return torch.get_num_threads()
