"""Task vectors and the helpers every merger shares.

A specialist θᵢ fine-tuned from θ₀ is described by its task vector τᵢ = θᵢ − θ₀, one tensor per state-dict key
(Ilharco et al., "Editing models with task arithmetic", ICLR 2023). Mergers see θ₀ and the specialists as mappings
from timm ViT keys to tensors and must stream them key by key: a specialist mapping may be lazy (reading one key
loads one tensor from disk), so no helper here ever holds more than one key of all N specialists at once.

Conventions shared by all mergers (see `shared/design/merging.md`):

- families are processed in sorted name order, so a merge is deterministic whatever the mapping's order;
- arithmetic on task vectors is float64 and the result is cast back to θ₀'s dtype once, at the end;
- keys whose τ is zero in every specialist are copied from θ₀ bit for bit; non-floating keys (integer buffers)
  are copied from θ₀ too (they are checked for shape and dtype, never merged);
- heads are always averaged (`average_heads`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]

# Randomized SVD (Halko et al. 2011, Algorithm 4.4; LU between the float32 products as in Li et al.'s fbpca, QR in the
# float64 finish): 7 products of width q + 16 per matrix (5 float32, 2 float64), chosen for speed at real scale. The
# rank-q approximation then matches the exact one to ~5e-9 to 2e-8 (relative) on decaying spectra and is within 0.1 %
# of the optimal truncation error on flat ones (tests/test_mergers.py checks both). On the benchmark's ViT-L residuals
# (a few spikes on a flat noise bulk: q = 102 lies inside it, σ_{q+16}/σ_q ≈ 0.98) its truncation error is 0.9-1.2 %
# above the optimal one (6 power iterations, 2.3× slower: 0.3 %); which bulk directions are kept is then not
# identifiable, and R²M's τ_res differs from svd=exact's by 90 % of its norm (6 iterations: 69 %). The seed is fixed
# and re-applied for every matrix, so a matrix's approximation does not depend on which other matrices were truncated
# before it. Precision: `_randomized_svd`.
RANDOMIZED_SVD_OVERSAMPLE = 16
RANDOMIZED_SVD_NITER = 2
RANDOMIZED_SVD_SEED = 0
SVD_METHODS = ("exact", "randomized")  # the `svd` knob of CART, R²M and TSV-M

# The 2-D weights inside attention and MLP blocks of a timm ViT. Split q/k/v projections (checkpoints that do not
# fuse qkv) count too, so that truncating a fused qkv as three blocks and truncating split keys agree.
_MATRIX_KEY = re.compile(r"(?:^|\.)blocks\.\d+\.(?:attn\.(?:qkv|proj|q|k|v|q_proj|k_proj|v_proj)|mlp\.fc[12])\.weight$")
_FUSED_QKV_KEY = re.compile(r"(?:^|\.)attn\.qkv\.weight$")
# A dotted component naming a normalisation layer: norm, norm1, fc_norm, q_norm, norm_pre, ln_1, ln_post, ...
_NORM_PART = re.compile(r"norm|^ln(?:_|\d|$)")
_MAX_LISTED = 10


@dataclass
class MergeResult:
    """What every merger returns.

    backbone: θ*'s state dict, with exactly θ₀'s keys (in θ₀'s order), shapes and dtypes.
    head: the averaged real/fake head, {"weight": (2, D), "bias": (2,)}.
    diagnostics: JSON-serialisable facts about the merge (spectra, norms, timings), written to the merge card.
    """

    backbone: dict[str, Tensor]
    head: dict[str, Tensor]
    diagnostics: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------- keys


def is_matrix_key(key: str) -> bool:
    """True for the 2-D weights inside attention and MLP blocks (qkv, proj, fc1, fc2; split q/k/v too)."""
    return _MATRIX_KEY.search(key) is not None


def is_fused_qkv(key: str) -> bool:
    """True for a fused attention input projection, stored as one (3d × d) matrix."""
    return _FUSED_QKV_KEY.search(key) is not None


def is_norm_or_bias(key: str) -> bool:
    """True for biases (`*.bias`, `*_bias`) and every parameter of a normalisation layer."""
    parts = key.split(".")
    if parts[-1] == "bias" or parts[-1].endswith("_bias"):
        return True
    return any(_NORM_PART.search(part) for part in parts)


def split_qkv(weight: Tensor) -> Tensor:
    """View a fused qkv weight (..., 3d, n) as its q, k and v blocks (..., 3, d, n); no copy."""
    rows = weight.shape[-2]
    if rows % 3:
        raise ValueError(f"a fused qkv weight needs a row count divisible by 3, got shape {tuple(weight.shape)}")
    return weight.unflatten(-2, (3, rows // 3))


def fuse_qkv(blocks: Tensor | Sequence[Tensor]) -> Tensor:
    """Inverse of `split_qkv`: (..., 3, d, n) or a sequence (q, k, v) of (..., d, n) -> (..., 3d, n)."""
    if not isinstance(blocks, Tensor):
        blocks = torch.stack(list(blocks), dim=-3)
    if blocks.shape[-3] != 3:
        raise ValueError(f"expected 3 blocks (q, k, v), got shape {tuple(blocks.shape)}")
    return blocks.flatten(-3, -2)


def matrix_blocks(key: str, weight: Tensor) -> Tensor:
    """The matrices that per-matrix operations act on: (..., m, n) -> (..., B, m/B, n), B = 3 for a fused qkv."""
    return split_qkv(weight) if is_fused_qkv(key) else weight.unsqueeze(-3)


# ----------------------------------------------------------------------------------------------------- checking


def _listed(keys: Sequence[str] | set[str]) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def family_names(specialists: Mapping[str, Any]) -> list[str]:
    """The specialists' family names in the order every merger uses (sorted); refuses an empty mapping."""
    names = sorted(specialists)
    if not names:
        raise ValueError("no specialists to merge")
    return names


def check_keys(theta0: StateDict, specialists: Mapping[str, StateDict]) -> None:
    """Refuse specialists whose key set differs from θ₀'s; the message names each specialist and its keys."""
    reference = set(theta0.keys())
    problems = []
    for name in family_names(specialists):
        keys = set(specialists[name].keys())
        missing, unexpected = reference - keys, keys - reference
        if missing or unexpected:
            parts = [
                f"missing keys [{_listed(missing)}]" if missing else "",
                f"unexpected keys [{_listed(unexpected)}]" if unexpected else "",
            ]
            problems.append(f"specialist {name!r}: " + "; ".join(p for p in parts if p))
    if problems:
        raise ValueError("specialists do not match theta0's keys:\n  " + "\n  ".join(problems))


def tensor_problem(name: str, key: str, reference: Tensor, tensor: Any) -> str | None:
    """Why `tensor` (specialist `name`, `key`) cannot be merged with θ₀'s `reference`, or None if it can."""
    if not isinstance(tensor, Tensor):
        return f"specialist {name!r}: key {key!r} is a {type(tensor).__name__}, not a tensor"
    if tensor.shape != reference.shape:
        return f"specialist {name!r}: key {key!r} has shape {tuple(tensor.shape)}, theta0 has {tuple(reference.shape)}"
    if tensor.dtype != reference.dtype:
        return f"specialist {name!r}: key {key!r} has dtype {tensor.dtype}, theta0 has {reference.dtype}"
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        return f"specialist {name!r}: key {key!r} has {bad} non-finite values (NaN/inf)"
    return None


def check_tensor(name: str, key: str, reference: Tensor, tensor: Any) -> None:
    """Raise ValueError naming specialist and key if `tensor` has another shape or dtype, or non-finite values."""
    problem = tensor_problem(name, key, reference, tensor)
    if problem:
        raise ValueError(problem)


def check_compatible(theta0: StateDict, specialists: Mapping[str, StateDict]) -> None:
    """Refuse specialists that differ from θ₀ in keys, shapes or dtypes, or hold non-finite values.

    One full pass (each tensor read once); every problem of every specialist is listed in the ValueError. The
    mergers run the key check up front and the per-tensor checks as they stream, so calling this first is optional.
    """
    check_keys(theta0, specialists)
    names = family_names(specialists)
    problems = []
    for key in theta0:
        reference = theta0[key]
        problem = tensor_problem("theta0", key, reference, reference)
        problems += [problem] if problem else []
        for name in names:
            problem = tensor_problem(name, key, reference, specialists[name][key])
            problems += [problem] if problem else []
    if problems:
        raise ValueError("specialists are not compatible with theta0:\n  " + "\n  ".join(problems))


def check_heads(heads: Mapping[str, Mapping[str, Tensor]], names: Sequence[str]) -> None:
    """Refuse a heads mapping whose families differ from the specialists'."""
    missing, unexpected = set(names) - set(heads), set(heads) - set(names)
    if missing or unexpected:
        raise ValueError(
            f"heads do not match the specialists: missing heads for [{_listed(missing)}], "
            f"heads without a specialist [{_listed(unexpected)}]"
        )


# ---------------------------------------------------------------------------------------------------- streaming


def read_task_vectors(
    theta0: StateDict, specialists: Mapping[str, StateDict], names: Sequence[str], key: str
) -> tuple[Tensor, Tensor | None]:
    """θ₀[key] and the stacked task vectors (N, *shape) in float64 (None for non-floating keys), checked.

    Reads each specialist's tensor for this one key only; raises ValueError naming specialist and key on a shape
    or dtype mismatch or a non-finite value.
    """
    reference = theta0[key]
    tensors = [specialists[name][key] for name in names]

    def check_all() -> None:
        check_tensor("theta0", key, reference, reference)
        for name, tensor in zip(names, tensors, strict=True):
            check_tensor(name, key, reference, tensor)

    if not reference.is_floating_point() or any(
        not isinstance(t, Tensor) or t.shape != reference.shape or t.dtype != reference.dtype for t in tensors
    ):
        check_all()  # raises on a mismatch; a non-floating key (no values to check) passes
        return reference, None
    # float64 differences of float32 weights are exact, so θ₀ + τ reproduces θᵢ bit for bit after the final cast.
    # Filled in place: one float64 buffer instead of N converted copies, N differences and their stack.
    taus = torch.empty((len(tensors), *reference.shape), dtype=torch.float64, device=reference.device)
    for row, tensor in zip(taus, tensors, strict=True):
        row.copy_(tensor)
    taus.sub_(reference)
    # One reduction instead of N + 1 isfinite masks: a NaN/inf in θ₀ or any θᵢ makes the float64 sum of the task
    # vectors non-finite. Only then (or if a huge finite float64 sum overflowed) the per-tensor check runs, to name the
    # tensor; it raises unless the sum merely overflowed.
    if not math.isfinite(float(taus.sum())):
        check_all()
    return reference, taus


def iter_task_vectors(
    theta0: StateDict, specialists: Mapping[str, StateDict], names: Sequence[str]
) -> Iterator[tuple[str, Tensor, Tensor | None]]:
    """Yield (key, θ₀[key], τ stack (N, *shape) float64 or None) for every key of θ₀, in θ₀'s order."""
    for key in theta0:
        reference, taus = read_task_vectors(theta0, specialists, names, key)
        yield key, reference, taus


def apply_delta(reference: Tensor, delta: Tensor) -> Tensor:
    """θ₀[key] + δ computed in float64, cast back to θ₀'s dtype (the one rounding of the whole merge)."""
    return (reference.to(torch.float64) + delta.reshape(reference.shape)).to(reference.dtype)


def gram(taus: Tensor) -> Tensor:
    """Inner products of one key's task vectors: (N, *shape) -> (N, N) float64 on the CPU."""
    flat = taus.reshape(taus.shape[0], -1)
    return (flat @ flat.T).to(device="cpu", dtype=torch.float64)


def is_zero(taus: Tensor, key_gram: Tensor) -> bool:
    """True if every task vector of one key is zero, given its Gram (N, N): a zero diagonal (‖τᵢ‖² = 0) settles it
    without another pass over the tensor, except that squares of float64 values below ~1e-154 underflow to 0, so a
    zero diagonal is confirmed on the tensor itself."""
    return not bool(key_gram.diagonal().any()) and not bool(taus.any())


# -------------------------------------------------------------------------------------------------- diagnostics


def cosines_from_gram(gram_matrix: Tensor) -> list[list[float]]:
    """Cosine matrix (nested list) from a Gram matrix; a zero task vector has cosine 0 with everything."""
    norms = gram_matrix.diagonal().clamp_min(0).sqrt()
    denominator = norms[:, None] * norms[None, :]
    cosines = torch.where(denominator > 0, gram_matrix / denominator.clamp_min(1e-300), 0.0)
    return cosines.clamp(-1.0, 1.0).tolist()


def task_vector_gram(theta0: StateDict, specialists: Mapping[str, StateDict]) -> tuple[list[str], Tensor]:
    """(names, G) with G = Σ_keys τᵢ·τⱼ over all floating keys, (N, N) float64; streams key by key."""
    names = family_names(specialists)
    check_keys(theta0, specialists)
    total = torch.zeros(len(names), len(names), dtype=torch.float64)
    for _, _, taus in iter_task_vectors(theta0, specialists, names):
        if taus is not None:
            total += gram(taus)
    return names, total


def task_vector_norms(theta0: StateDict, specialists: Mapping[str, StateDict]) -> dict[str, float]:
    """‖τᵢ‖₂ over all floating keys, by family."""
    names, total = task_vector_gram(theta0, specialists)
    return dict(zip(names, total.diagonal().sqrt().tolist(), strict=True))


def task_vector_cosines(theta0: StateDict, specialists: Mapping[str, StateDict]) -> tuple[list[str], list[list[float]]]:
    """(names, N×N cosine matrix as a nested list) of the whole task vectors; streams key by key."""
    names, total = task_vector_gram(theta0, specialists)
    return names, cosines_from_gram(total)


# ------------------------------------------------------------------------------------------------------- heads


def average_heads(heads: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The merged head: the mean of every head tensor over families, {"weight": (2, D), "bias": (2,)}."""
    names = family_names(heads)
    first = heads[names[0]]
    merged = {}
    for key in first:
        reference = first[key]
        for name in names:
            if set(heads[name]) != set(first):
                raise ValueError(
                    f"head of {name!r} has keys {sorted(heads[name])}, head of {names[0]!r} has {sorted(first)}"
                )
            problem = tensor_problem(name, f"head.{key}", reference, heads[name][key])
            if problem:
                raise ValueError(problem.replace("theta0", f"the head of {names[0]!r}"))
        stacked = torch.stack([heads[name][key].to(torch.float64) for name in names])
        merged[key] = stacked.mean(0).to(reference.dtype)
    return merged


# ------------------------------------------------------------------------------------------------ low-rank SVD


def kept_rank(rows: int, cols: int, rank_ratio: float) -> int:
    """q = max(1, ⌊ρ·min(m, n)⌋); the 1e-9 guards ⌊0.29·100⌋ against 28.999999999999996."""
    return max(1, math.floor(rank_ratio * min(rows, cols) + 1e-9))


def _range_basis(matrix: Tensor) -> Tensor:
    """A well-conditioned basis of the column space of ``matrix`` (m, k), m ≥ k, for the next product of a power
    iteration: P·L of its pivoted LU factorisation (half the work of a Householder QR and no Q to form; |Lᵢⱼ| ≤ 1, so
    the columns do not collapse onto the top singular direction). Not orthonormal: only its span is used."""
    # _ex: no error on a rank-deficient matrix (a zero or low-rank residual): LAPACK then leaves the zero column of the
    # elimination unscaled, and the unit-diagonal L still spans range(matrix) plus arbitrary bounded directions
    factors, pivots, _ = torch.linalg.lu_factor_ex(matrix)
    lower = factors.tril_(-1)  # (m, k): L below the diagonal, written in place (the factors are ours)
    lower.diagonal().fill_(1.0)  # unit diagonal
    order = np.arange(matrix.shape[0])  # LAPACK's pivots are successive row swaps (1-based): P·L puts row i at order[i]
    for row, pivot in enumerate((pivots - 1).tolist()):
        order[row], order[pivot] = order[pivot], order[row]
    # row-major like the matrix (LAPACK's factors are column-major): the products that follow run on this layout
    basis = torch.empty(lower.shape, dtype=lower.dtype, device=lower.device)
    basis[torch.from_numpy(order).to(matrix.device)] = lower
    return basis


def _randomized_svd(matrix: Tensor, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized rank-q SVD of one matrix (m, n) -> U (m, q) orthonormal, σ (q,) descending, Vh (q, n) orthonormal
    rows, in the matrix's dtype.

    Work on the tall side A (m ≥ n), with k = q + RANDOMIZED_SVD_OVERSAMPLE columns. Range finder, in float32 whatever
    the input: Y = A Ω, then RANDOMIZED_SVD_NITER power iterations Y ← A (Aᵀ Y), each product's result reduced to a
    basis of its span by `_range_basis` (pivoted LU). Finish, in the input's dtype: Q₁ = orth(Aᵀ Y) (n, k), the SVD of
    the small R of A Q₁ = Q₂ R = Q₂ (U S Wᵀ) gives A ≈ A Q₁ Q₁ᵀ = (Q₂ U) S (Q₁ W)ᵀ, truncated to q. Products:
    1 + 2·NITER in float32, 2 in the input's dtype (no separate projection B = QᵀA: A Q₁ is both the last half
    iteration and the projection).

    float64 input: the float32 range finder leaves its basis off by ~1e-7 in angle, and a basis that misses a leading
    singular direction by ε changes the truncation by ~ε·σ; the float64 product Aᵀ Y shrinks that error by σ_{k+1}/σⱼ
    in direction j before the float64 projection, below the randomized method's own convergence error.
    float32 input: all float32.
    """
    rows, cols = matrix.shape
    # (m, n), m ≥ n: the basis spans the column space of the tall side; a wide matrix is transposed into a contiguous
    # copy (measured: its products and the float32 copy ~1.4× slower on the transposed view)
    tall = matrix if rows >= cols else matrix.mT.contiguous()
    sketch_dtype = torch.float32 if tall.dtype == torch.float64 else tall.dtype
    generator = torch.Generator(device=matrix.device).manual_seed(RANDOMIZED_SVD_SEED)
    width = q + RANDOMIZED_SVD_OVERSAMPLE
    sketch = torch.randn(tall.shape[1], width, generator=generator, dtype=sketch_dtype, device=matrix.device)
    low = tall.to(sketch_dtype)
    basis = _range_basis(low @ sketch)  # (m, k)
    for _ in range(RANDOMIZED_SVD_NITER):
        basis = _range_basis(low @ _range_basis(low.mT @ basis))  # (n, k), then (m, k)
    right = torch.linalg.qr(tall.mT @ basis.to(tall.dtype)).Q  # (n, k) orthonormal, in the input's dtype
    left, small = torch.linalg.qr(tall @ right)  # A Q₁ = Q₂ R: (m, k), (k, k)
    u, s, wh = torch.linalg.svd(small)  # R = U S Wᵀ, so A Q₁ Q₁ᵀ = (Q₂ U) S (Q₁ W)ᵀ
    left = left @ u[:, :q]  # (m, q) orthonormal
    vh = wh[:q] @ right.mT  # (q, n)
    if rows >= cols:
        return left, s[:q], vh
    return vh.mT, s[:q], left.mT  # A = (tall)ᵀ ≈ Vh_qᵀ S leftᵀ


def truncated_svd(matrices: Tensor, q: int, method: str = "exact") -> tuple[Tensor, Tensor, Tensor]:
    """The top q singular triplets of each matrix: (..., m, n) -> U (..., m, q), σ (..., q), Vh (..., q, n).

    `exact`: torch.linalg.svd in the input's dtype. `randomized`: a randomized SVD with RANDOMIZED_SVD_OVERSAMPLE
    extra columns and RANDOMIZED_SVD_NITER power iterations, seeded per matrix (results do not depend on batch
    neighbours or call order); float64 input gets a float32 range finder and a float64 finish (`_randomized_svd`;
    accuracy: the comment above RANDOMIZED_SVD_OVERSAMPLE). It falls back to the exact SVD
    when q plus the oversampling reaches min(m, n), where a randomized sketch would save nothing.
    """
    rows, cols = matrices.shape[-2:]
    if not 1 <= q <= min(rows, cols):
        raise ValueError(f"rank {q} is outside [1, {min(rows, cols)}] for {rows}×{cols} matrices")
    if method not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {method!r}")
    if method == "exact" or q + RANDOMIZED_SVD_OVERSAMPLE >= min(rows, cols):
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
        return u[..., :q], s[..., :q], vh[..., :q, :]
    flat = matrices.reshape(-1, rows, cols)
    triplets = [_randomized_svd(matrix, q) for matrix in flat]  # one seeded sketch per matrix
    batch = matrices.shape[:-2]
    u = torch.stack([t[0] for t in triplets]).reshape(*batch, rows, q)
    s = torch.stack([t[1] for t in triplets]).reshape(*batch, q)
    vh = torch.stack([t[2] for t in triplets]).reshape(*batch, q, cols)
    return u, s, vh


def low_rank_factors(matrices: Tensor, q: int, method: str = "exact") -> tuple[Tensor, Tensor]:
    """Best rank-q approximation of each matrix, as factors: (..., m, n) -> US (..., m, q), Vh (..., q, n).

    ``method``: "exact" or "randomized", as in `truncated_svd`.
    """
    u, s, vh = truncated_svd(matrices, q, method)
    return u * s[..., None, :], vh


# ------------------------------------------------------------------------------------------------ polar factor
# TSV-M and Iso-C need the orthogonal polar factor U Vᵀ of A = U diag(σ) Vᵀ (and Iso-C its σ), of every singular
# direction: a low-rank (randomized) SVD cannot give it. `polar: gram` takes it from the eigen-decomposition of the
# smaller Gram matrix, AᵀA = V diag(σ²) Vᵀ, as A V diag(1/σ) Vᵀ: the same quantity in exact arithmetic, ~2-3× cheaper
# than an SVD on CPU (a symmetric eigen-solver and three products against a bidiagonalisation and two back-
# transforms). Squaring A squares its condition number κ, and the error of (AᵀA)^(-1/2) grows like eps·κ², so a
# matrix with σ_min/σ_max < POLAR_GRAM_MIN_SIGMA_RATIO (float64: eps·κ² ≤ 1e-6 in its weakest direction, ~3e-8 of a
# 1024-wide U Vᵀ, below the float32 rounding of θ*) is decomposed by the SVD instead; `polar: svd` always uses the SVD
# (the papers' route). 1e-4 sent most square ViT-L blocks of the benchmark's sums (spiked spectra) to the SVD.
POLAR_METHODS = ("gram", "svd")
POLAR_GRAM_MIN_SIGMA_RATIO = 1e-5


def polar_factor(matrices: Tensor, method: str = "gram") -> tuple[Tensor, Tensor]:
    """U Vᵀ and σ (descending) of each matrix A = U diag(σ) Vᵀ: (..., m, n) -> ((..., m, n), (..., min(m, n))).

    In the input's dtype. ``method``: "gram" or "svd" (module comment above `POLAR_METHODS`). With "gram" a matrix
    whose σ_min/σ_max is below POLAR_GRAM_MIN_SIGMA_RATIO (or that is zero) goes through the SVD, so a rank-deficient
    matrix gets the SVD's choice of directions for its zero singular values, as with "svd".
    """
    check_choice("polar", method, POLAR_METHODS)
    if method == "svd":
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
        return u @ vh, s
    rows, cols = matrices.shape[-2:]
    tall = rows >= cols
    small = matrices.mT @ matrices if tall else matrices @ matrices.mT  # (..., r, r), r = min(m, n)
    eigenvalues, vectors = torch.linalg.eigh(small)  # ascending
    top = eigenvalues[..., -1:]
    good = (top[..., 0] > 0) & (eigenvalues[..., 0] > POLAR_GRAM_MIN_SIGMA_RATIO**2 * top[..., 0])
    sigma = eigenvalues.clamp_min(0).sqrt()
    inverse_root = (vectors / sigma.clamp_min(torch.finfo(sigma.dtype).tiny)[..., None, :]) @ vectors.mT  # (AᵀA)^-½
    polar = matrices @ inverse_root if tall else inverse_root @ matrices
    sigma = sigma.flip(-1)
    if not bool(good.all()):
        flat_polar, flat_sigma = polar.reshape(-1, rows, cols), sigma.reshape(-1, min(rows, cols))
        for index in (~good).reshape(-1).nonzero().squeeze(1).tolist():
            u, s, vh = torch.linalg.svd(matrices.reshape(-1, rows, cols)[index], full_matrices=False)
            flat_polar[index], flat_sigma[index] = u @ vh, s
    return polar, sigma


# ------------------------------------------------------------------------------------- baseline mergers' helpers
# Shared by ties, dare, cart, tsv and iso_c: knob checks, a seed that does not depend on key order, phase timings,
# a streaming pass that hands each key's name to its combiner, and the diagnostics every merger reports.


def is_finite_number(value: Any) -> bool:
    """True for an int or float (not a bool) that is finite: what every scalar knob (λ, density, ...) must be."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise ValueError naming the knob and its allowed values if ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts' text (SHA-256): the same on every run and machine, unlike Python's hash()."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)


class PhaseTimer:
    """Wall-clock seconds per phase of a merge: ``tick("pass1")`` closes the phase that just ran; ``timings`` adds
    the total since construction."""

    def __init__(self) -> None:
        self._start = self._lap = time.perf_counter()
        self._timings: dict[str, float] = {}

    def tick(self, phase: str) -> None:
        now = time.perf_counter()
        self._timings[phase] = self._timings.get(phase, 0.0) + now - self._lap
        self._lap = now

    @property
    def timings(self) -> dict[str, float]:
        return {**self._timings, "total": time.perf_counter() - self._start}


@dataclass
class StreamedMerge:
    """What `merge_keys` returns: θ*'s backbone and the task-vector Gram it accumulated on the way."""

    backbone: dict[str, Tensor]
    task_gram: Tensor  # (N, N) float64, Σ_keys τᵢ·τⱼ over every floating key
    n_zero_keys: int  # floating keys whose τ is zero in every specialist (copied from θ₀)


# An elementwise combiner (averaging, task arithmetic) is applied to a key on the CPU in chunks of this many entries, so
# the (N, chunk) float64 task vectors stay in cache from the float64 copy through the difference, the Gram, the
# combination and the rounding, instead of six passes over (N, P) float64 arrays in memory (measured on a 4096 × 1024
# key, N = 3, one thread: 52 ms against 280 ms).
ELEMENTWISE_CHUNK = 1 << 16


def _merge_key_in_chunks(
    reference: Tensor, tensors: Sequence[Tensor], combine: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """θ₀[key] + combine(τ) for an elementwise ``combine`` ((N, c) float64 -> (c,) float64), chunk by chunk.

    Returns (θ*[key] in θ₀'s dtype, the key's Gram (N, N) float64, the float64 sum of all its task-vector entries, a
    finiteness check). Each entry is computed exactly as `apply_delta(reference, combine(τ stack))` computes it.
    """
    flat_reference = reference.reshape(-1)
    flats = [tensor.reshape(-1) for tensor in tensors]
    size = flat_reference.numel()
    merged = torch.empty_like(flat_reference)
    key_gram = torch.zeros(len(tensors), len(tensors), dtype=torch.float64)
    checksum = torch.zeros((), dtype=torch.float64)
    buffer = torch.empty(len(tensors), min(size, ELEMENTWISE_CHUNK), dtype=torch.float64)
    for start in range(0, size, ELEMENTWISE_CHUNK):
        stop = min(size, start + ELEMENTWISE_CHUNK)
        taus = buffer[:, : stop - start]  # (N, c)
        for row, flat in zip(taus, flats, strict=True):
            row.copy_(flat[start:stop])
        base = flat_reference[start:stop].to(torch.float64, copy=True)  # a copy even for float64 θ₀: added to below
        taus.sub_(base)
        checksum += taus.sum()
        key_gram += taus @ taus.T
        merged[start:stop] = base.add_(combine(taus))  # = (θ₀ in float64 + δ), rounded once to θ₀'s dtype
    return merged.reshape(reference.shape), key_gram, checksum


def cpu_tensors(
    theta0: StateDict, specialists: Mapping[str, StateDict], names: Sequence[str], key: str
) -> list[Tensor]:
    """The specialists' tensors for one floating CPU key of θ₀, each read once (as `read_task_vectors` reads them),
    checked for θ₀'s shape, dtype and device; raises ValueError naming specialist and key otherwise. Values are not
    checked here: chunked passes check a running sum instead."""
    reference = theta0[key]
    tensors = [specialists[name][key] for name in names]
    if not all(
        isinstance(t, Tensor) and t.shape == reference.shape and t.dtype == reference.dtype and t.is_cpu
        for t in tensors
    ):
        for name, tensor in zip(names, tensors, strict=True):
            check_tensor(name, key, reference, tensor)  # raises on a shape or dtype mismatch
        raise ValueError(f"key {key!r}: some specialist's tensor is not on theta0's device (cpu)")
    return tensors


def merge_keys(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    names: Sequence[str],
    combine: Callable[[str, Tensor], Tensor],
    elementwise: bool = False,
) -> StreamedMerge:
    """The one streaming loop: θ*[key] = θ₀[key] + combine(key, τ stack (N, *shape) float64), keys in θ₀'s order.

    The combiner gets the key (per-matrix methods split a fused qkv, DARE seeds its mask by key). Keys whose τ is
    zero in every specialist and non-floating keys are copied from θ₀ bit for bit. Single-pass mergers call it
    through `merge_key_by_key`; multi-pass ones (TIES' thresholds first) call it for their last pass.
    ``elementwise``: the combiner only reduces over the task axis (entry p of the result depends on entry p of each
    τᵢ alone, and not on the key's shape), so on the CPU it gets (N, c) chunks of the flattened key instead
    (ELEMENTWISE_CHUNK; the result is the same bits, the Gram differs by float64 rounding).
    """
    task_gram = torch.zeros(len(names), len(names), dtype=torch.float64)
    backbone, zero_keys = {}, 0
    for key in theta0:
        reference = theta0[key]
        if elementwise and reference.device.type == "cpu" and reference.is_floating_point():
            tensors = cpu_tensors(theta0, specialists, names, key)
            merged, key_gram, checksum = _merge_key_in_chunks(reference, tensors, functools.partial(combine, key))
            if not math.isfinite(float(checksum)):  # a NaN/inf somewhere (or an overflowing sum): name the tensor
                check_tensor("theta0", key, reference, reference)
                for name, tensor in zip(names, tensors, strict=True):
                    check_tensor(name, key, reference, tensor)
            # τ = 0 exactly where θᵢ = θ₀ (float64 differences of θ₀'s dtype are exact), as `is_zero` decides it
            if not bool(key_gram.diagonal().any()) and all(torch.equal(t, reference) for t in tensors):
                backbone[key] = reference.clone()
                zero_keys += 1
                continue
            task_gram += key_gram
            backbone[key] = merged
            continue
        reference, taus = read_task_vectors(theta0, specialists, names, key)
        key_gram = None if taus is None else gram(taus)
        if key_gram is None or is_zero(taus, key_gram):
            backbone[key] = reference.clone()
            zero_keys += taus is not None
            continue
        task_gram += key_gram
        backbone[key] = apply_delta(reference, combine(key, taus))
    return StreamedMerge(backbone, task_gram, zero_keys)


def merge_diagnostics(
    merger: str,
    names: Sequence[str],
    hyperparameters: Mapping[str, Any],
    task_gram: Tensor,
    n_keys: int,
    n_zero_keys: int,
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """The diagnostics every baseline merger reports (JSON-serialisable); method-specific facts are added to it."""
    norms = task_gram.diagonal().clamp_min(0).sqrt()
    return {
        "merger": merger,
        "families": list(names),
        "hyperparameters": dict(hyperparameters),
        "n_keys": n_keys,
        "n_zero_keys": n_zero_keys,
        "task_vector_norms": dict(zip(names, norms.tolist(), strict=True)),
        "task_vector_cosines": cosines_from_gram(task_gram),
        "timings_s": dict(timings),
    }


def merge_key_by_key(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    heads: Mapping[str, Mapping[str, Tensor]],
    merger: str,
    combine: Callable[[str, Tensor], Tensor],
    hyperparameters: Mapping[str, Any] | None = None,
    timer: PhaseTimer | None = None,
    elementwise: bool = False,
) -> MergeResult:
    """A single-pass merger from its combiner: checks, one `merge_keys` pass, averaged heads, shared diagnostics.

    ``combine(key, taus)`` maps one key's (N, *shape) float64 task-vector stack to its merged delta (*shape). The
    keys and heads are checked before the first tensor is read. ``timer`` (started by the caller when it did work
    before the pass) gets the phase "merge". ``elementwise``: see `merge_keys`. Method-specific facts go into the
    result's diagnostics afterwards.
    """
    timer = timer or PhaseTimer()
    names = family_names(specialists)
    check_keys(theta0, specialists)
    check_heads(heads, names)
    streamed = merge_keys(theta0, specialists, names, combine, elementwise)
    timer.tick("merge")
    diagnostics = merge_diagnostics(
        merger,
        names,
        hyperparameters or {},
        streamed.task_gram,
        len(streamed.backbone),
        streamed.n_zero_keys,
        timer.timings,
    )
    return MergeResult(backbone=streamed.backbone, head=average_heads(heads), diagnostics=diagnostics)
