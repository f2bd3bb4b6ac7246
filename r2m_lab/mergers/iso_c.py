"""Iso-C: isotropic merging in the common subspace.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces", ICML 2025 (arXiv 2502.04959); official code github.com/danielm1405/iso-merging
(`src/utils/iso.py`, `iso_c`). Per matrix key (a fused qkv as three d×d blocks):

    Σᵢ τᵢ = U diag(σ) Vᵀ   (thin SVD, r = min(m, n) singular values)
    Δ = σ̄ U Vᵀ,  σ̄ = (1/r) Σⱼ σⱼ                 every direction of the summed task matrix gets the same weight

Other keys (biases, norms, embeddings): Δ = τ̄ = (1/N) Σᵢ τᵢ. θ* = θ₀ + λ·Δ with the SAME λ on every key; heads
averaged. This is the official code's formula: its merged task vector is the mean on every key and, on 2-D keys, the
isotropic version of N·mean = the sum; it is then added with the scaling coefficient α chosen on validation data
(their grid: α ∈ (0, 3]). So `lam` IS the authors' α, for any N, and λ = 1.0 (the default) is official Iso-C at
α = 1. (Before this was fixed, matrix keys got (λ/N)·Δ and other keys λ·τ̄, which no λ reproduced once N > 1.)

Deliberate differences from the official code, both from shared/design/merging.md's definition of matrix keys:
- a fused qkv (timm `attn.qkv.weight`, open_clip `in_proj_weight`) is three d×d matrices here, one 3d×d matrix there;
  so results do not depend on whether a checkpoint fuses q, k and v;
- only the weights inside attention and MLP blocks are matrix keys. The official code SVD-merges every 2-D key except
  `text_projection`: in open_clip layout that includes the (L × d) `positional_embedding` and the visual `proj`.
  In timm layout `pos_embed` is 3-D (1 × L × d) and is averaged here (Δ = τ̄); a timm backbone built with
  `num_classes=0` has no projection key.

Identical specialists: N copies of τ₁ give Δ = N·σ̄(τ₁)·U Vᵀ on matrices and τ₁ elsewhere (as in the official code),
so for N > 1 no single λ returns the specialist. One specialist (N = 1) whose matrices have a flat spectrum
(τ = c·orthogonal) is returned at λ = 1; for any other spectrum Iso-C flattens it on purpose. Singular directions
with σⱼ = 0 (a rank-deficient sum) get σ̄ too: that is the method, and their directions are whatever the SVD returns.

One float64 decomposition per matrix (of the sum; N is not involved): `polar: gram` (default) takes U Vᵀ and σ from
the eigen-decomposition of the Gram AᵀA, ~2-3× faster than the SVD on CPU and the same in exact arithmetic, with the
SVD for a matrix whose σ_min/σ_max < 1e-5 (task_vectors.polar_factor); `polar: svd` is the official code's route.
One streaming pass, one key of all N in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from r2m_lab.mergers.contract import ScaledKnobs
from r2m_lab.mergers.task_vectors import (
    POLAR_METHODS,
    MergeResult,
    PhaseTimer,
    average_heads,
    check_choice,
    check_heads,
    check_keys,
    family_names,
    is_matrix_key,
    matrix_blocks,
    merge_diagnostics,
    merge_keys,
    polar_factor,
)

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class IsoC(ScaledKnobs):
    """Iso-C (module docstring). lam: λ on the isotropic merge; polar: "gram" | "svd", how U Vᵀ and σ are computed
    (`task_vectors.polar_factor`; conf/merger/iso_c.yaml)."""

    polar: str

    def check(self, n_tasks: int | None = None) -> None:
        """Refuse a λ that is not a finite number, or an unknown polar method."""
        super().check(n_tasks)
        check_choice("polar", self.polar, POLAR_METHODS)

    def __call__(
        self, theta0: StateDict, specialists: Mapping[str, StateDict], heads: Mapping[str, Mapping[str, Tensor]]
    ) -> MergeResult:
        """θ₀ + λ·(isotropic merge on matrix keys, τ̄ elsewhere), heads averaged (`merge`)."""
        return merge(theta0, specialists, heads, self)


def isotropic(matrices: Tensor, polar: str = "gram") -> tuple[Tensor, Tensor]:
    """σ̄ U Vᵀ of each matrix and its σ̄: (..., m, n) -> ((..., m, n), (...,)), in the input's dtype.

    ``polar``: how U Vᵀ and σ are computed (`task_vectors.polar_factor`: "gram" or "svd").
    """
    orthogonal, s = polar_factor(matrices, polar)
    mean_sigma = s.mean(-1)
    return mean_sigma[..., None, None] * orthogonal, mean_sigma


def merge(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    heads: Mapping[str, Mapping[str, Tensor]],
    knobs: IsoC,
) -> MergeResult:
    """Iso-C (module docstring): θ₀ + λ·(σ̄ U Vᵀ of Σᵢ τᵢ on matrix keys; τ̄ elsewhere); heads averaged. ``knobs.lam``
    is the authors' α, the same on every key."""
    names = family_names(specialists)
    check_keys(theta0, specialists)
    check_heads(heads, names)
    timer = PhaseTimer()
    ranks: dict[str, int] = {}
    mean_sigmas: dict[str, list[float]] = {}
    lam = float(knobs.lam)

    def combine(key: str, taus: Tensor) -> Tensor:
        if not (is_matrix_key(key) and taus.ndim == 3):
            return lam * taus.mean(0)
        blocks = matrix_blocks(key, taus.sum(0, keepdim=True))[0]  # (B, m/B, n): the summed task matrix per block
        iso, mean_sigma = isotropic(blocks, knobs.polar)
        ranks[key] = min(blocks.shape[-2:])  # Iso-C keeps every direction, at the same weight
        mean_sigmas[key] = mean_sigma.tolist()
        return lam * iso.reshape(taus.shape[1:])

    streamed = merge_keys(theta0, specialists, names, combine)
    timer.tick("merge")
    diagnostics = merge_diagnostics(
        "iso_c",
        names,
        {"lam": lam, "polar": knobs.polar},
        streamed.task_gram,
        len(streamed.backbone),
        streamed.n_zero_keys,
        timer.timings,
    )
    diagnostics["kept_rank"] = ranks  # directions kept per matrix (per d×d block for a fused qkv): all of them
    diagnostics["mean_singular_value"] = mean_sigmas  # σ̄ of Σᵢ τᵢ per block, before λ
    return MergeResult(backbone=streamed.backbone, head=average_heads(heads), diagnostics=diagnostics)
