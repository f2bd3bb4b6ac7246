"""CPU threads: the ``threads`` knob (torch's intra-op thread count, set once when a stage starts) and how waiting
OpenMP threads behave.

Measured on a 2-core AMD EPYC shared with other work (the tiny ViT, a 64-frame training step): with OpenMP's default
wait policy the two threads of a step spin at every barrier while the other one is descheduled, and a step took
several times longer than on one thread; with ``OMP_WAIT_POLICY=PASSIVE`` (a waiting thread sleeps) the same two
threads were faster than one again. ``python -m r2m_lab`` therefore sets ``OMP_WAIT_POLICY=PASSIVE`` unless the
environment already names a policy: the thread count, the work split and so every number stay those of torch's
default, only the waiting changes. It must be set before torch is imported (OpenMP reads it once, at load).

``threads: auto`` keeps torch's default (one thread per core) in the stage's process. ``threads: N`` sets N in
every process of the stage. On a CPU-only machine the pipeline fine-tunes several models side by side, one process
each (``r2m_lab.stages.pipeline.finetune_lanes``): ``cores // N`` processes of N threads under ``threads: N``, and
under ``auto`` one single-thread process per core when the backbone is small (``backbone.cpu_side_by_side``: the
tiny ViT) while the pipeline's own process keeps every core for θ₀, the merges and the evaluation. Several
single-thread fine-tunes of a small model use the cores better than one fine-tune on every core. Another thread
count can change float reductions (the same config then gives slightly other weights), so metrics.json records the
counts in effect (``threads``, ``finetune_lanes``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

AUTO = "auto"
WAIT_POLICY = "OMP_WAIT_POLICY"


def passive_openmp_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment names a policy; True when it is in effect.

    Only effective before torch (and with it the OpenMP runtime) is loaded in this process; spawned worker
    processes inherit it.
    """
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    if "torch" in sys.modules:
        log.debug("%s set after torch was imported: this process keeps OpenMP's policy at load", WAIT_POLICY)
        return False
    return os.environ[WAIT_POLICY].upper() == "PASSIVE"


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

    ``auto`` leaves torch's default untouched. Called once at stage start (``r2m_lab.__main__``) and in each worker
    process, before any tensor work, so every phase of the stage (training, merging, scoring) runs with one count.
    """
    import torch

    n = parse_threads(value)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
        log.info("threads=%d: torch uses %d CPU thread(s) in this process", n, n)
    return torch.get_num_threads()
