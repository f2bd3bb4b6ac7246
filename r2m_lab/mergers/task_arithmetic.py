"""Task arithmetic: θ* = θ₀ + λ Σᵢ τᵢ.

Ilharco et al., "Editing models with task arithmetic", ICLR 2023. λ (default 0.3) is chosen on the in-distribution
validation split; λ = 1/N is weight averaging and λ = 0 returns θ₀.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
from torch import Tensor

from r2m_lab.mergers.task_vectors import (
    MergeResult,
    apply_delta,
    average_heads,
    check_heads,
    check_keys,
    cosines_from_gram,
    family_names,
    gram,
    iter_task_vectors,
)


def merge(
    theta0: Mapping[str, Tensor],
    specialists: Mapping[str, Mapping[str, Tensor]],
    heads: Mapping[str, Mapping[str, Tensor]],
    *,
    lam: float = 0.3,
) -> MergeResult:
    """θ₀ + λ Σᵢ τᵢ on every key (one streaming pass), heads averaged."""
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number, got {lam!r}")
    start = time.perf_counter()
    names = family_names(specialists)
    check_keys(theta0, specialists)
    check_heads(heads, names)
    task_gram = torch.zeros(len(names), len(names), dtype=torch.float64)
    backbone, zero_keys = {}, 0
    for key, reference, taus in iter_task_vectors(theta0, specialists, names):
        if taus is None or not taus.any():
            backbone[key] = reference.clone()
            zero_keys += taus is not None
            continue
        task_gram += gram(taus)
        backbone[key] = apply_delta(reference, float(lam) * taus.sum(0))
    diagnostics = {
        "merger": "task_arithmetic",
        "families": names,
        "hyperparameters": {"lam": float(lam)},
        "n_keys": len(backbone),
        "n_zero_keys": zero_keys,
        "task_vector_norms": dict(zip(names, task_gram.diagonal().sqrt().tolist(), strict=True)),
        "task_vector_cosines": cosines_from_gram(task_gram),
        "timings_s": {"total": time.perf_counter() - start},
    }
    return MergeResult(backbone=backbone, head=average_heads(heads), diagnostics=diagnostics)
