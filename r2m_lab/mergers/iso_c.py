"""Iso-C: isotropic merging in the common subspace.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces", ICML 2025 (arXiv 2502.04959). Per matrix key (a fused qkv as three d×d blocks):

    Σᵢ τᵢ = U diag(σ) Vᵀ   (thin SVD, r = min(m, n) singular values)
    iso = σ̄ U Vᵀ,  σ̄ = (1/r) Σⱼ σⱼ              every direction of the summed task matrix gets the same weight
    merged = iso / N

Other keys (biases, norms, embeddings): merged = τ̄. θ* = θ₀ + λ·merged; heads averaged.

Scale (decided here): the paper scales the isotropic *sum* by α chosen on validation data; this module divides it by
N so that `lam` acts on the same scale as weight averaging on every key, and λ = 1.0 is the default (the paper's α
is λ/N). Then N identical specialists whose matrices have a flat spectrum (τ = c·orthogonal) give that specialist;
for any other spectrum Iso-C flattens it on purpose, so identical specialists give its isotropic version, not it.
Singular directions with σⱼ = 0 (a rank-deficient sum) get σ̄ too: that is the method, and their directions are
whatever the SVD returns.

One float64 SVD per matrix (of the sum; N is not involved), one streaming pass, one key of all N in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from r2m_lab.mergers.contract import Knobs
from r2m_lab.mergers.task_vectors import (
    MergeResult,
    PhaseTimer,
    average_heads,
    check_heads,
    check_keys,
    family_names,
    is_finite_number,
    is_matrix_key,
    matrix_blocks,
    merge_diagnostics,
    merge_keys,
)

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class IsoC(Knobs):
    """Iso-C (module docstring). lam: λ on the isotropic merge (conf/merger/iso_c.yaml)."""

    lam: float

    def check(self, n_tasks: int | None = None) -> None:
        """Refuse a λ that is not a finite number."""
        if not is_finite_number(self.lam):
            raise ValueError(f"lam must be a finite number, got {self.lam!r}")

    def __call__(
        self, theta0: StateDict, specialists: Mapping[str, StateDict], heads: Mapping[str, Mapping[str, Tensor]]
    ) -> MergeResult:
        """θ₀ + λ·(isotropic merge on matrix keys, τ̄ elsewhere), heads averaged (`merge`)."""
        return merge(theta0, specialists, heads, self)


def isotropic(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """σ̄ U Vᵀ of each matrix and its σ̄: (..., m, n) -> ((..., m, n), (...,)), in the input's dtype."""
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    mean_sigma = s.mean(-1)
    return mean_sigma[..., None, None] * (u @ vh), mean_sigma


def merge(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    heads: Mapping[str, Mapping[str, Tensor]],
    knobs: IsoC,
) -> MergeResult:
    """Iso-C (module docstring): θ₀ + λ·(σ̄ U Vᵀ of Σᵢ τᵢ, over N, on matrix keys; τ̄ elsewhere); heads averaged."""
    names = family_names(specialists)
    check_keys(theta0, specialists)
    check_heads(heads, names)
    timer = PhaseTimer()
    ranks: dict[str, int] = {}
    mean_sigmas: dict[str, list[float]] = {}
    lam = float(knobs.lam)
    n = len(names)

    def combine(key: str, taus: Tensor) -> Tensor:
        if not (is_matrix_key(key) and taus.ndim == 3):
            return lam * taus.mean(0)
        blocks = matrix_blocks(key, taus.sum(0, keepdim=True))[0]  # (B, m/B, n): the summed task matrix per block
        iso, mean_sigma = isotropic(blocks)
        ranks[key] = min(blocks.shape[-2:])  # Iso-C keeps every direction, at the same weight
        mean_sigmas[key] = (mean_sigma / n).tolist()
        return (lam / n) * iso.reshape(taus.shape[1:])

    streamed = merge_keys(theta0, specialists, names, combine)
    timer.tick("merge")
    diagnostics = merge_diagnostics(
        "iso_c", names, {"lam": lam}, streamed.task_gram, len(streamed.backbone), streamed.n_zero_keys, timer.timings
    )
    diagnostics["kept_rank"] = ranks  # directions kept per matrix (per d×d block for a fused qkv): all of them
    diagnostics["mean_singular_value"] = mean_sigmas  # σ̄/N per block, before λ
    return MergeResult(backbone=streamed.backbone, head=average_heads(heads), diagnostics=diagnostics)
