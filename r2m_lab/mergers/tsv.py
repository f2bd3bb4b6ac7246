"""TSV-M: Task Singular Vectors merging.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, "Task Singular Vectors: Reducing Task Interference in
Model Merging", CVPR 2025 (arXiv 2412.00081). Per matrix key (a fused qkv as three d×d blocks), with N tasks:

    τᵢ ≈ Uᵢ diag(σᵢ) Vᵢᵀ            rank q = max(1, ⌊min(m, n)/N⌋) truncation of each task vector
    U = [U₁ … U_N] (m × Nq),  V = [V₁ … V_N] (n × Nq),  σ = [σ₁ … σ_N]
    U⊥ = P Qᵀ from U = P S Qᵀ        the polar factor: the orthogonal matrix nearest U (same for V⊥)
    merged = U⊥ diag(σ) V⊥ᵀ

Other keys (biases, norms, embeddings): merged = τ̄. θ* = θ₀ + λ·merged (λ: conf/merger/tsv.yaml, 1.0); heads averaged.

Orthogonalising the concatenated singular vectors removes the overlap between tasks' subspaces (their interference)
while keeping every task's singular values. Flipping the sign of a pair (uⱼ, vⱼ) flips the same columns of U⊥ and
V⊥, so the result does not depend on the SVD's sign choices. If N > min(m, n), Nq exceeds the dimension and U⊥ has
orthonormal rows instead of columns (the polar factor is still the nearest partial isometry).

Deliberate differences from the official code (github.com/danielm1405/iso-merging, `TSVM_utils.py`), both from
shared/design/merging.md's definition of matrix keys: the official code SVD-merges every 2-D key except
`text_projection`, which in open_clip layout includes the (L × d) `positional_embedding` and the visual `proj`, and it
treats open_clip's fused `in_proj_weight` as one 3d×d matrix. Here only the weights inside attention and MLP blocks
are matrix keys, a fused qkv is three d×d blocks (so fusion does not change the result), and timm's 3-D
(1 × L × d) `pos_embed` is averaged (τ̄) like every other non-matrix key.

The N truncating SVDs run in float32 (weights are float32 or narrower): `svd: exact` (default, the papers' route)
takes the top q triplets of torch.linalg.svd; `svd: randomized` those of the seeded randomized SVD R²M and CART use
(task_vectors.truncated_svd: q + 16 columns, 2 power iterations). The truncations are most of TSV-M's time. At N = 3
q is a third of the rank, deep inside the flat noise bulk of a fine-tune-like τ, so WHICH bulk directions are kept is
not identifiable: on the `make bench-merge` ViT-L/14 task vectors (layer 0's four matrix keys) each randomized
truncation's error is 2.4-2.6 % above the optimal one, but the merged τ* differs from svd=exact's by 84 % of its
norm. It is a different rank-q choice of similar quality, not an approximation of exact's result: exact stays the
default (and what the papers and peer code compute); randomized is for fast sweeps, its speed in the README.
The two polar factors are float64, by default (`polar: gram`) from the eigen-decomposition of their (Nq × Nq) Gram
matrices, ~2-3× faster than their SVDs on CPU and the same in exact arithmetic, with the SVD for an ill-conditioned U
or V (task_vectors.polar_factor; `polar: svd` always). One streaming pass; one key of all N specialists in memory at a
time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from r2m_lab.mergers.contract import ScaledKnobs
from r2m_lab.mergers.task_vectors import (
    POLAR_METHODS,
    SVD_METHODS,
    MergeResult,
    check_choice,
    is_matrix_key,
    matrix_blocks,
    merge_key_by_key,
    polar_factor,
    truncated_svd,
)

StateDict = Mapping[str, Tensor]


def task_singular_vectors_merge(key: str, taus: Tensor, polar: str = "gram", svd: str = "exact") -> tuple[Tensor, int]:
    """TSV-M on one matrix key: (N, m, n) float64 -> ((m, n) float64 merged, q kept per task and block).

    ``polar``: how the polar factors of the concatenated U and V are computed (`task_vectors.polar_factor`).
    ``svd``: "exact" or "randomized" truncation (`task_vectors.truncated_svd`).
    """
    blocks = matrix_blocks(key, taus).to(torch.float32)  # (N, B, m/B, n)
    n_tasks, n_blocks, rows, cols = blocks.shape
    q = max(1, min(rows, cols) // n_tasks)
    u, s, vh = truncated_svd(blocks, q, svd)  # (N, B, m, q), (N, B, q), (N, B, q, n)
    # task-major concatenation along the rank axis: (B, m, N·q), (B, N·q), (B, N·q, n)
    u_all = u.permute(1, 2, 0, 3).reshape(n_blocks, rows, n_tasks * q)
    s_all = s.permute(1, 0, 2).reshape(n_blocks, n_tasks * q)
    vh_all = vh.permute(1, 0, 2, 3).reshape(n_blocks, n_tasks * q, cols)
    u_perp = polar_factor(u_all.to(torch.float64), polar)[0]
    vh_perp = polar_factor(vh_all.to(torch.float64).mT, polar)[0].mT  # V⊥ᵀ: orthogonalise V (n × Nq), transpose
    merged = (u_perp * s_all.to(torch.float64)[:, None, :]) @ vh_perp  # (B, m/B, n)
    return merged.reshape(taus.shape[1:]), q


@dataclass(frozen=True)
class TSV(ScaledKnobs):
    """TSV-M (module docstring). lam: λ on the merged task vector; polar: "gram" | "svd", how the polar factors are
    computed (`task_vectors.polar_factor`); svd: "exact" | "randomized", how each τᵢ is truncated."""

    polar: str
    svd: str

    def check(self, n_tasks: int | None = None) -> None:
        """Refuse a λ that is not a finite number, or an unknown polar or svd method."""
        super().check(n_tasks)
        check_choice("polar", self.polar, POLAR_METHODS)
        check_choice("svd", self.svd, SVD_METHODS)

    def __call__(
        self, theta0: StateDict, specialists: Mapping[str, StateDict], heads: Mapping[str, Mapping[str, Tensor]]
    ) -> MergeResult:
        """θ₀ + λ·(U⊥ diag(σ) V⊥ᵀ on matrix keys, τ̄ elsewhere); heads averaged."""
        ranks: dict[str, int] = {}
        lam = float(self.lam)

        def combine(key: str, taus: Tensor) -> Tensor:
            if not (is_matrix_key(key) and taus.ndim == 3):
                return lam * taus.mean(0)
            merged, ranks[key] = task_singular_vectors_merge(key, taus, self.polar, self.svd)
            return lam * merged

        hyperparameters = {"lam": lam, "polar": self.polar, "svd": self.svd}
        result = merge_key_by_key(theta0, specialists, heads, "tsv", combine, hyperparameters)
        result.diagnostics["kept_rank"] = ranks  # q per task and matrix (per d×d block for a fused qkv)
        return result
