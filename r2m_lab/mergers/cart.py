"""CART: Centered Arithmetic with Rank-reduced Task vectors.

Choi, Kim, Lee, Hong, "Revisiting Weight Averaging for Model Merging", arXiv 2412.12153 (2024). Weight averaging is
task arithmetic centred at τ̄ = (1/N) Σᵢ τᵢ; CART keeps the top singular directions of each centred task vector:

    matrix keys   θ* = θ₀ + τ̄ + λ Σᵢ SVD_q(τᵢ − τ̄),   q = max(1, ⌊ρ·min(m, n)⌋), ρ = `rank_ratio` (default 0.1)
    other keys    θ* = θ₀ + τ̄

SVD_q is the best rank-q approximation (`svd: exact | randomized`, see task_vectors.low_rank_factors), taken per
matrix: a fused qkv weight is three d×d blocks, so fused and split q/k/v checkpoints merge alike. The paper reports a
kept rank near 8 % as best; ρ = 0.1 matches R²M's default so the two are compared at the same rank.

λ default 1.0 (conf/merger/cart.yaml, decided here; the paper selects it on validation data, as the pipeline does): each
task's top-ρ centred direction is added back unscaled. At ρ = 1 every λ gives weight averaging, since
Σᵢ (τᵢ − τ̄) = 0, and identical specialists give that specialist exactly (every τᵢ − τ̄ is 0), whatever ρ and λ.

The truncation runs in float32 (the weights are float32 or narrower, and it is about 2× faster); the rest is float64.
One streaming pass; one key of all N specialists in memory at a time. Heads are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from r2m_lab.mergers.contract import Knobs
from r2m_lab.mergers.task_vectors import (
    SVD_METHODS,
    MergeResult,
    check_choice,
    is_finite_number,
    is_matrix_key,
    kept_rank,
    low_rank_factors,
    matrix_blocks,
    merge_key_by_key,
)

StateDict = Mapping[str, Tensor]


def centred_low_rank_sum(key: str, taus: Tensor, rank_ratio: float, svd: str) -> tuple[Tensor, int]:
    """Σᵢ SVD_q(τᵢ − τ̄) for one matrix key, (N, m, n) -> ((m, n) float64, q per block)."""
    residuals = taus - taus.mean(0)  # (N, m, n)
    blocks = matrix_blocks(key, residuals)  # (N, B, m/B, n)
    rows, cols = blocks.shape[-2:]
    q = kept_rank(rows, cols, rank_ratio)
    if q >= min(rows, cols) or not residuals.any():  # nothing to truncate: the sum is Σ(τᵢ − τ̄) itself
        return residuals.sum(0), q
    us, vh = low_rank_factors(blocks.to(torch.float32), q, svd)  # (N, B, m/B, q), (N, B, q, n)
    total = torch.einsum("ibmq,ibqn->bmn", us.to(torch.float64), vh.to(torch.float64))  # (B, m/B, n)
    return total.reshape(taus.shape[1:]), q  # block-major = a fused qkv's row order


@dataclass(frozen=True)
class CART(Knobs):
    """CART (module docstring). rank_ratio: ρ ∈ (0, 1]; lam: λ on the low-rank centred sum; svd: exact | randomized."""

    rank_ratio: float
    lam: float
    svd: str

    def check(self, n_tasks: int | None = None) -> None:
        """Refuse out-of-range knobs before any work."""
        if not is_finite_number(self.rank_ratio) or not 0 < self.rank_ratio <= 1:
            raise ValueError(
                f"rank_ratio must be a fraction in (0, 1] (0.1 keeps 10 % of the rank), got {self.rank_ratio!r}"
            )
        if not is_finite_number(self.lam):
            raise ValueError(f"lam must be a finite number, got {self.lam!r}")
        check_choice("svd", self.svd, SVD_METHODS)

    def __call__(
        self, theta0: StateDict, specialists: Mapping[str, StateDict], heads: Mapping[str, Mapping[str, Tensor]]
    ) -> MergeResult:
        """θ₀ + τ̄ + λ Σᵢ SVD_ρ(τᵢ − τ̄) on matrix keys, θ₀ + τ̄ elsewhere; heads averaged."""
        ranks: dict[str, int] = {}
        lam, rank_ratio, svd = float(self.lam), float(self.rank_ratio), self.svd

        def combine(key: str, taus: Tensor) -> Tensor:
            mean = taus.mean(0)
            if not (is_matrix_key(key) and taus.ndim == 3):
                return mean
            low_rank, ranks[key] = centred_low_rank_sum(key, taus, rank_ratio, svd)
            return mean + lam * low_rank

        hp = {"rank_ratio": rank_ratio, "lam": lam, "svd": svd}
        result = merge_key_by_key(theta0, specialists, heads, "cart", combine, hp)
        result.diagnostics["kept_rank"] = ranks  # q per matrix (per d×d block for a fused qkv)
        return result
