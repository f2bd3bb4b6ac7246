"""Weight averaging: θ* = θ₀ + τ̄ = (1/N) Σᵢ θᵢ.

"Model soups" (Wortsman et al., ICML 2022). The R²M paper (arXiv 2509.24367) starts from the observation that
plain averaging keeps the specialists' shared Real representation while attenuating their Fake-specific cues.
"""

from __future__ import annotations

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
) -> MergeResult:
    """θ₀ + mean τᵢ on every key (one streaming pass), heads averaged."""
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
        # mean = sum / N (not Σ τᵢ/N), so N identical specialists give that specialist exactly.
        backbone[key] = apply_delta(reference, taus.mean(0))
    diagnostics = {
        "merger": "average",
        "families": names,
        "n_keys": len(backbone),
        "n_zero_keys": zero_keys,
        "task_vector_norms": dict(zip(names, task_gram.diagonal().sqrt().tolist(), strict=True)),
        "task_vector_cosines": cosines_from_gram(task_gram),
        "timings_s": {"total": time.perf_counter() - start},
    }
    return MergeResult(backbone=backbone, head=average_heads(heads), diagnostics=diagnostics)
