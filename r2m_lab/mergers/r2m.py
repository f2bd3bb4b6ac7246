"""R²M: Real-aware Residual Model Merging.

Park, Kim, Cho, "Real-Aware Residual Model Merging for Deepfake Detection", arXiv 2509.24367 (2025). The exact
contract, including the choices the paper leaves open, is `shared/design/merging.md`; its steps map to this code:

With task vectors τᵢ = θᵢ − θ₀ (i = 1..N) and, per key l, Aˡ ∈ ℝ^{N×Pˡ} whose rows are vec(τᵢˡ) (minus the mean
row when `center`), L = every key except norms and biases, γˡ = 1 (`block_weight="none"`) or 1/‖Aˡ‖²_F ("equal"; a
fused qkv counts as its three d×d blocks, each with its own γ, so a fused and a split q/k/v checkpoint give the same
merge under every knob, to float64 rounding):

2. real subspace   G = Σ_{l∈L} γˡ Aˡ Aˡᵀ (N×N, float64); top-k eigenpairs (λⱼ, uⱼ) with λⱼ > 1e-12·λ_max
3. real core       a = Σ_{l∈L} γˡ Aˡ τ̄ˡ,  w = Uₖ Λₖ⁻¹ Uₖᵀ a,  τ_coreˡ = Aˡᵀ w on L and τ̄ˡ elsewhere
                   (the projection of τ̄ onto the top-k right singular vectors of the stacked task matrix)
4. fake residuals  rᵢ = τᵢ − τ_core
5. truncation      r̂ᵢˡ = best rank-q approximation of rᵢˡ on matrix keys, q = max(1, ⌊ρ·min(m, n)⌋), a fused qkv
                   truncated as three d×d blocks; other keys untouched. The SVD and its stored factors are float64
6. norm matching   nᵢ = ‖r̂ᵢ‖₂ over all keys, m = meanᵢ nᵢ, τ_res = (1/N) Σᵢ (m/nᵢ) r̂ᵢ (a zero residual stays 0)
7. merge           θ* = θ₀ + τ_core + η·τ_res, η = eta | α‖τ_core‖₂ | α‖τ_core‖₂/‖τ_res‖₂ (`eta_mode`)
8. head            averaged

Streaming (N is small, D is hundreds of millions; the N×D task matrix is never formed):
pass 1 reads every key of every specialist once, checks it and accumulates G, a and the plain task-vector Gram;
the N×N eigen-problem gives w; pass 2 reads the keys again, forms each key's residuals, truncates the matrix ones
(keeping them as low-rank factors US, Vh, not dense copies) and accumulates the N×N inner products of the r̂ᵢ, from
which every global norm of steps 6–7 follows; pass 3 reads the keys a third time, rebuilds τ_core (an N-term
combination, cheaper to recompute than to hold as a float64 copy of the backbone) and writes θ*. Keys whose τ is zero
in every specialist are read in pass 1 only. Extra memory: the float64 factors, about 2·N·ρ·(m+n)/max(m, n) float32
backbones.

Precision. Everything runs in float64 and θ* is rounded to θ₀'s dtype once; `svd="exact"` truncates with a float64
SVD, `svd="randomized"` with a float32 range finder (2 power iterations) and a float64 finish: one half iteration,
which is also the projection, and the small SVD (task_vectors.low_rank_factors). The truncation needs float64: with
`eta_mode="relative"` and few specialists the norm-matched residuals can nearly cancel (N = 2: r₁ ≈ −r₂,
‖τ_res‖/‖τ_core‖ ≈ 1e-4), η = α‖τ_core‖/‖τ_res‖ ≈ 1e4 then amplifies the rounding of the r̂ᵢ by the same factor: a
float32 SVD (rounding ~1e-7 of ‖r̂ᵢ‖) gave a 4e-3 relative error in η·τ_res, the float64 exact SVD gives ~1e-8 and the
randomized one ~1e-6 at η ≈ 4e3 on decaying spectra, mostly its convergence error (its error grows with η; svd=exact
is the accurate choice there). Without near cancellation (e.g. eta_mode=fixed, the selection grid's η ≤ 12) the
relative error of η·τ_res is that of the truncation, ~1e-8 on decaying spectra, far below the float32 rounding of θ*.
A merge in that regime still logs a warning (‖τ_res‖ < NEAR_CANCELLATION·‖τ_core‖ = 1e-3 with `relative`, i.e.
η > 1e3·α): η·τ_res is then mostly the difference of nearly equal residuals, which amplifies any noise in them.

A residual whose norm is below 1e-10 of its natural scale (‖τᵢ‖ + ‖τ_core‖) is float64 round-off, not signal, and
is treated as zero: this is what makes identical specialists give that specialist bit for bit whatever ρ and η
(otherwise `eta_mode="relative"` would blow round-off up to α‖τ_core‖).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from r2m_lab.mergers.contract import Knobs
from r2m_lab.mergers.task_vectors import (
    SVD_METHODS,
    MergeResult,
    apply_delta,
    average_heads,
    check_heads,
    check_keys,
    cosines_from_gram,
    family_names,
    gram,
    is_finite_number,
    is_matrix_key,
    is_norm_or_bias,
    is_zero,
    iter_task_vectors,
    kept_rank,
    low_rank_factors,
    matrix_blocks,
    read_task_vectors,
)

BLOCK_WEIGHTS = ("none", "equal")
ETA_MODES = ("fixed", "core_norm", "relative")

EIGEN_RTOL = 1e-12  # eigenpairs with λ ≤ 1e-12·λ_max are numerical null space (merging.md step 2)
ZERO_RESIDUAL_RTOL = 1e-10  # see the module docstring
NEAR_CANCELLATION = 1e-3  # eta_mode="relative" warns when ‖τ_res‖ < this·‖τ_core‖ (module docstring, "Precision")

logger = logging.getLogger(__name__)

StateDict = Mapping[str, Tensor]


# ---------------------------------------------------------------------------------------------- the small math


def core_rows(flat: Tensor, center: bool) -> Tensor:
    """Aˡ: one key's task vectors as rows (N, P), minus their mean row when centering."""
    return flat - flat.mean(0) if center else flat


def block_weight_of(key_gram: Tensor, block_weight: str) -> float:
    """γˡ: 1, or 1/‖Aˡ‖²_F (= 1/trace Aˡ Aˡᵀ) so every block counts equally; a zero block gets 0."""
    if block_weight == "none":
        return 1.0
    energy = float(key_gram.trace())
    return 1.0 / energy if energy > 0 else 0.0


def weighted_block_sums(
    key: str, taus: Tensor, center: bool, block_weight: str, plain_gram: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One key's contribution to G and a: (Σ_b γᵇ Aᵇ Aᵇᵀ (N, N), Σ_b γᵇ Aᵇ τ̄ᵇ (N,)), float64 on the CPU.

    taus: (N, *shape). The blocks b are the key itself, or for `block_weight="equal"` on a fused qkv its q, k and v
    (each with its own γ, as split q/k/v keys would get); with γ = 1 the split changes nothing, so it is skipped.
    Both sums follow from each block's plain Gram C = F Fᵀ (F: the block's rows, N × P/B): with H = I − 11ᵀ/N when
    centering (else I), A = H F, A Aᵀ = H C H and A τ̄ = H F Fᵀ 1/N = H C 1/N. So each block costs one pass over
    its entries (its Gram), and none when ``plain_gram`` (= `gram(taus)`, already computed) covers the whole key.
    """
    n = taus.shape[0]
    if block_weight == "equal" and is_matrix_key(key) and taus.ndim == 3:
        blocks = matrix_blocks(key, taus).flatten(2)  # (N, B, P/B): B = 3 for a fused qkv, else 1
    else:
        blocks = taus.reshape(n, 1, -1)  # (N, B, P/B)
    whole = plain_gram is not None and blocks.shape[1] == 1
    plain_grams = [plain_gram] if whole else [gram(block) for block in blocks.unbind(1)]
    centering = torch.eye(n, dtype=torch.float64) - (1.0 / n if center else 0.0)  # H (N, N)
    key_gram = torch.zeros(n, n, dtype=torch.float64)
    key_a = torch.zeros(n, dtype=torch.float64)
    for block_plain in plain_grams:
        block_gram = centering @ block_plain @ centering
        weight = block_weight_of(block_gram, block_weight)
        key_gram += weight * block_gram
        key_a += weight * (centering @ block_plain).sum(1) / n
    return key_gram, key_a


@dataclass
class RealSubspace:
    """The eigen-decomposition of G and the core weights w (τ_coreˡ = Aˡᵀ w on L)."""

    eigenvalues: Tensor  # (N,) float64, descending
    eigenvectors: Tensor  # (N, N) float64, column j pairs with eigenvalues[j]
    rank: int  # eigenpairs kept: ≤ k, after dropping λ ≤ EIGEN_RTOL·λ_max
    weights: Tensor  # (N,) float64, w = Uₖ Λₖ⁻¹ Uₖᵀ a


def real_subspace(gram_matrix: Tensor, a: Tensor, k: int) -> RealSubspace:
    """Top-k eigenpairs of G and w = Uₖ Λₖ⁻¹ Uₖᵀ a; w = 0 when no eigenvalue is significant (τ_core = 0 on L)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram_matrix.to(torch.float64))
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # descending
    top = float(eigenvalues[0])
    rank = sum(1 for value in eigenvalues[:k].tolist() if top > 0 and value > EIGEN_RTOL * top)
    u = eigenvectors[:, :rank]  # (N, rank)
    weights = u @ ((u.T @ a.to(torch.float64)) / eigenvalues[:rank])
    return RealSubspace(eigenvalues, eigenvectors, rank, weights)


def key_core(flat: Tensor, weights: Tensor, in_core: bool, center: bool) -> Tensor:
    """τ_coreˡ (P,): Aˡᵀ w for keys of L, τ̄ˡ for norms and biases."""
    if not in_core:
        return flat.mean(0)
    return core_rows(flat, center).T @ weights.to(device=flat.device, dtype=flat.dtype)


def residual_scales(residual_norms: Tensor, scales_of_zero: Tensor, norm_matching: bool) -> Tensor:
    """cᵢ with τ_res = Σᵢ cᵢ r̂ᵢ: (m/nᵢ)/N with norm matching, 1/N without; 0 for a (numerically) zero residual.

    residual_norms: nᵢ (N,); scales_of_zero: the scale each nᵢ is compared with (‖τᵢ‖ + ‖τ_core‖), (N,).
    """
    n = residual_norms.numel()
    alive = residual_norms > ZERO_RESIDUAL_RTOL * scales_of_zero
    if not norm_matching:
        return alive.to(torch.float64) / n
    norms = torch.where(alive, residual_norms, 0.0)
    target = norms.mean()  # m = meanᵢ nᵢ, over all N specialists (a zero residual counts as 0)
    return torch.where(alive, target / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0) / n


def eta_value(eta_mode: str, eta: float, alpha: float, core_norm: float, residual_norm: float) -> float:
    """η of step 7; `relative` with a zero τ_res gives 0 (there is nothing to scale)."""
    if eta_mode == "fixed":
        return float(eta)
    if eta_mode == "core_norm":
        return alpha * core_norm
    return alpha * core_norm / residual_norm if residual_norm > 0 else 0.0


def combine_factors(us: Tensor, vh: Tensor | None, scales: Tensor) -> Tensor:
    """Σᵢ cᵢ r̂ᵢ for one matrix key from its stored truncation, flattened (P,) float64.

    us, vh: (N, B, m, q), (N, B, q, n) factors, or us = dense r̂ (N, B, m, n) and vh = None; scales: c (N,).
    """
    scales = scales.to(device=us.device, dtype=torch.float64)
    if vh is None:
        return torch.tensordot(scales, us.to(torch.float64), dims=1).reshape(-1)
    n_tasks, n_blocks, rows, rank = us.shape
    # Σᵢ cᵢ USᵢ Vhᵢ as one product per block: (B, m, N·q) @ (B, N·q, n), never N dense (m, n) copies.
    left = (us.to(torch.float64) * scales[:, None, None, None]).permute(1, 2, 0, 3).reshape(n_blocks, rows, -1)
    right = vh.to(torch.float64).permute(1, 0, 2, 3).reshape(n_blocks, n_tasks * rank, -1)
    return (left @ right).reshape(-1)  # block-major = a fused qkv's row order


def factor_gram(us: Tensor, vh: Tensor) -> Tensor:
    """Σ_b ⟨r̂ᵢᵇ, r̂ⱼᵇ⟩ for r̂ = US·Vh given as factors (N, B, m, q), (N, B, q, n): (N, N) float64 on the CPU.

    ⟨Uᵢ Vᵢ, Uⱼ Vⱼ⟩_F = Σ ((Uᵢᵀ Uⱼ) ∘ (Vᵢ Vⱼᵀ)), two (q × q) Gram blocks per pair instead of two dense (m × n) copies.
    """
    left = torch.einsum("ibmq,jbmr->ijbqr", us.to(torch.float64), us.to(torch.float64))  # (N, N, B, q, q)
    right = torch.einsum("ibqn,jbrn->ijbqr", vh.to(torch.float64), vh.to(torch.float64))
    return (left * right).sum((2, 3, 4)).cpu()


# ------------------------------------------------------------------------------------------------------ passes


@dataclass
class _Pass1:
    gram: Tensor  # (N, N) Σ_L γ A Aᵀ
    a: Tensor  # (N,) Σ_L γ A τ̄
    task_gram: Tensor  # (N, N) plain Σ τᵢ·τⱼ over all keys, for diagnostics
    active: list[str] = field(default_factory=list)  # floating keys with some non-zero τ, θ₀ order
    core_keys: set[str] = field(default_factory=set)  # those in L


def _pass1(
    theta0: StateDict, specialists: Mapping[str, StateDict], names: Sequence[str], center: bool, block_weight: str
) -> _Pass1:
    n = len(names)
    acc = _Pass1(
        torch.zeros(n, n, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64),
        torch.zeros(n, n, dtype=torch.float64),
    )
    for key, _, taus in iter_task_vectors(theta0, specialists, names):
        plain = None if taus is None else gram(taus)
        if plain is None or is_zero(taus, plain):
            continue
        acc.active.append(key)
        acc.task_gram += plain
        if is_norm_or_bias(key):
            continue
        acc.core_keys.add(key)
        key_gram, key_a = weighted_block_sums(key, taus, center, block_weight, plain)
        acc.gram += key_gram
        acc.a += key_a
    return acc


@dataclass
class _Pass2:
    residual_gram: Tensor  # (N, N) Σ r̂ᵢ·r̂ⱼ over all keys
    norm_sq_before: Tensor  # (N,) Σ ‖rᵢ‖² (before truncation)
    core_dot: Tensor  # (N,) Σ τᵢ·τ_core
    truncation_s: float = 0.0  # seconds in the rank-q factorisations (inside pass 2), for the timings
    core_sq: float = 0.0  # ‖τ_core‖²
    factors: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)  # truncated keys
    kept_rank: dict[str, int] = field(default_factory=dict)  # q per matrix (per d×d block for a fused qkv)


def _pass2(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    names: Sequence[str],
    first: _Pass1,
    weights: Tensor,
    *,
    center: bool,
    rank_ratio: float,
    svd: str,
    truncation: bool,
) -> _Pass2:
    n = len(names)
    acc = _Pass2(
        torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    )
    for key in first.active:
        _, taus = read_task_vectors(theta0, specialists, names, key)
        flat = taus.reshape(n, -1)  # (N, P)
        core = key_core(flat, weights, key in first.core_keys, center)  # (P,)
        acc.core_dot += (flat @ core).cpu()
        acc.core_sq += float(core @ core)
        # in place: the task vectors are not needed again in this pass, and a fresh (N, P) float64 buffer per key
        # costs its page faults (measured: pass 2 outside the truncations 6.1 → 5.6 s at ViT-L/14); same bits as
        # flat - core
        residuals = flat.sub_(core)  # (N, P)
        # one BLAS dot per row: no (N, P) float64 temporary of squares (measured on a (3, 4M) key: 1.8 ms against
        # 17 ms, ~2 s of a ViT-L/14 merge); these diagnostics agree with the squares' sum to float64 rounding
        acc.norm_sq_before += torch.stack([row.dot(row) for row in residuals]).cpu()
        if truncation and is_matrix_key(key) and taus.ndim == 3:
            blocks = matrix_blocks(key, residuals.reshape(taus.shape))  # (N, B, m, n)
            rows, cols = blocks.shape[-2:]
            q = acc.kept_rank[key] = kept_rank(rows, cols, rank_ratio)
            if q < min(rows, cols):  # ρ = 1 keeps everything: nothing to store, pass 3 rebuilds rᵢ exactly
                # float64 factors (float32 range finder, float64 finish if randomized): docstring, "Precision".
                started = time.perf_counter()
                us, vh = low_rank_factors(blocks, q, svd)  # (N, B, m, q), (N, B, q, n) float64
                acc.truncation_s += time.perf_counter() - started
                if q * (rows + cols) < rows * cols:
                    acc.factors[key] = (us, vh)
                    acc.residual_gram += factor_gram(us, vh)  # never densifies r̂: O(N²q²(m+n)), not O(Nmnq)
                    continue
                dense = us @ vh  # (N, B, m, n) r̂: smaller than its factors here
                acc.factors[key] = (dense, None)
                residuals = dense.reshape(n, -1)
        acc.residual_gram += gram(residuals)
    return acc


@dataclass
class _Plan:
    """Everything passes 1–2 and the norms decide, before θ* is written: what `_pass3` and `components` need."""

    names: list[str]
    center: bool
    first: _Pass1
    second: _Pass2
    subspace: RealSubspace
    scales: Tensor  # (N,) cᵢ with τ_res = Σᵢ cᵢ r̂ᵢ
    eta: float  # η of step 7, resolved from eta_mode
    core_norm: float
    residual_norm: float  # ‖τ_res‖ before η
    near_cancellation: bool
    timings: dict[str, float]


def _key_parts(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    names: Sequence[str],
    key: str,
    plan: _Plan,
    keep_factors: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One active key re-read: (θ₀[key], τ stack flattened (N, P), τ_coreˡ (P,), τ_resˡ before η (P,)), float64.

    The stored truncation of the key is consumed (freed) unless ``keep_factors``.
    """
    n = len(names)
    reference, taus = read_task_vectors(theta0, specialists, names, key)
    flat = taus.reshape(n, -1)
    core = key_core(flat, plan.subspace.weights, key in plan.first.core_keys, plan.center)
    if key in plan.second.factors:
        factors = plan.second.factors[key] if keep_factors else plan.second.factors.pop(key)
        residual = combine_factors(*factors, plan.scales)
    else:
        residual = plan.scales.to(flat.device) @ (flat - core)
    return reference, flat, core, residual


def _pass3(theta0: StateDict, specialists: Mapping[str, StateDict], names: Sequence[str], plan: _Plan) -> dict:
    active = set(plan.first.active)
    backbone = {}
    for key in theta0:
        if key not in active:  # τ ≡ 0 (or a non-floating buffer): θ₀ bit for bit
            backbone[key] = theta0[key].clone()
            continue
        reference, _, core, residual = _key_parts(theta0, specialists, names, key, plan)
        # core + η·r̂ and θ₀ + δ in place on the key's own float64 buffer: the same two roundings as the out-of-place
        # expressions (addition commutes bit for bit), without two fresh float64 copies of the key
        delta = residual.mul_(plan.eta).add_(core).reshape(reference.shape)
        backbone[key] = delta.add_(reference).to(reference.dtype)
    return backbone


# ------------------------------------------------------------------------------------------------------- merge


@dataclass(frozen=True)
class R2M(Knobs):
    """R²M's knobs (defaults and comments: conf/merger/r2m.yaml; every knob: shared/design/merging.md).

    k: rank of the real subspace (1 ≤ k ≤ N). center: subtract the mean task vector before the factorisation.
    block_weight: "none" (γ = 1) or "equal" (every key of L weighs the same in G). rank_ratio: ρ ∈ (0, 1].
    svd: "exact" or "randomized" truncation. eta_mode, eta, alpha: step 7. norm_matching, truncation: ablation
    switches for steps 6 and 5 (off: τ_res = mean r̂ᵢ; r̂ᵢ = rᵢ).
    """

    k: int
    center: bool
    block_weight: str
    rank_ratio: float
    svd: str
    eta_mode: str
    eta: float
    alpha: float
    norm_matching: bool
    truncation: bool

    def check(self, n_tasks: int | None = None) -> None:
        """Refuse out-of-range knobs before any work; ``n_tasks`` = N adds k ≤ N (the stages pass it at config time)."""
        k = self.k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer ≥ 1, got {k!r}")
        for name in ("center", "norm_matching", "truncation"):
            flag = getattr(self, name)
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        for name, allowed in (("block_weight", BLOCK_WEIGHTS), ("svd", SVD_METHODS), ("eta_mode", ETA_MODES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if not is_finite_number(self.rank_ratio) or not 0 < self.rank_ratio <= 1:
            raise ValueError(
                f"rank_ratio must be a fraction in (0, 1] (0.1 keeps 10 % of the rank), got {self.rank_ratio!r}"
            )
        for name in ("eta", "alpha"):
            value = getattr(self, name)
            if not is_finite_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if n_tasks is not None and k > n_tasks:
            raise ValueError(f"k={k} exceeds the number of specialists N={n_tasks}: the real subspace has rank ≤ N")

    def __call__(
        self, theta0: StateDict, specialists: Mapping[str, StateDict], heads: Mapping[str, Mapping[str, Tensor]]
    ) -> MergeResult:
        """θ₀ + τ_core + η·τ_res, heads averaged (`merge`)."""
        return merge(theta0, specialists, heads, self)


def _decompose(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    heads: Mapping[str, Mapping[str, Tensor]] | None,
    knobs: R2M,
) -> _Plan:
    """Checks, passes 1–2 and the global norms (steps 1–7 up to η): everything but writing θ* (`merge`)."""
    k, center, block_weight, rank_ratio, svd = knobs.k, knobs.center, knobs.block_weight, knobs.rank_ratio, knobs.svd
    eta_mode, eta, alpha = knobs.eta_mode, knobs.eta, knobs.alpha
    norm_matching, truncation = knobs.norm_matching, knobs.truncation
    names = family_names(specialists)
    if k > len(names):
        raise ValueError(f"k={k} exceeds the number of specialists N={len(names)} ({', '.join(names)})")
    check_keys(theta0, specialists)
    if heads is not None:
        check_heads(heads, names)

    timings: dict[str, float] = {}
    lap = time.perf_counter()

    def tick(phase: str) -> None:
        nonlocal lap
        now = time.perf_counter()
        timings[phase] = now - lap
        lap = now

    first = _pass1(theta0, specialists, names, center, block_weight)
    tick("pass1_gram")
    subspace = real_subspace(first.gram, first.a, k)
    tick("eigen")
    second = _pass2(
        theta0,
        specialists,
        names,
        first,
        subspace.weights,
        center=center,
        rank_ratio=rank_ratio,
        svd=svd,
        truncation=truncation,
    )
    tick("pass2_residuals")
    timings["pass2_of_which_truncation"] = second.truncation_s

    task_norms = first.task_gram.diagonal().clamp_min(0).sqrt()
    core_norm = math.sqrt(second.core_sq)
    residual_norms = second.residual_gram.diagonal().clamp_min(0).sqrt()  # nᵢ = ‖r̂ᵢ‖
    scales = residual_scales(residual_norms, task_norms + core_norm, norm_matching)
    residual_norm = math.sqrt(max(float(scales @ second.residual_gram @ scales), 0.0))  # ‖τ_res‖ = √(cᵀ R c)
    eta_used = eta_value(eta_mode, eta, alpha, core_norm, residual_norm)
    near_cancellation = eta_mode == "relative" and 0 < residual_norm < NEAR_CANCELLATION * core_norm
    if near_cancellation:
        logger.warning(
            "R²M eta_mode=relative: the residuals nearly cancel (‖τ_res‖/‖τ_core‖ = %.3g < %g), so η = %.4g amplifies "
            "them %.3g-fold; the merge is computed in float64, but η·τ_res is dominated by the small differences "
            "between the specialists' residuals (consider eta_mode=fixed or core_norm)",
            residual_norm / core_norm,
            NEAR_CANCELLATION,
            eta_used,
            eta_used,
        )
    tick("norms")
    return _Plan(
        names, center, first, second, subspace, scales, eta_used, core_norm, residual_norm, near_cancellation, timings
    )


def _diagnostics(plan: _Plan, knobs: R2M, n_keys: int) -> dict[str, Any]:
    """The merge card's facts about one R²M merge (JSON-serialisable)."""
    names, first, second, subspace = plan.names, plan.first, plan.second, plan.subspace
    n = len(names)
    task_norms = first.task_gram.diagonal().clamp_min(0).sqrt()
    residual_norms = second.residual_gram.diagonal().clamp_min(0).sqrt()
    u = subspace.eigenvectors[:, : subspace.rank]
    captured = (u.square() * subspace.eigenvalues[: subspace.rank]).sum(1)  # Σ_{j≤k} λⱼ uⱼᵢ² = ‖Pₖ rowᵢ‖²_γ
    row_energy = first.gram.diagonal()
    denominator = task_norms.square() * second.core_sq

    def by_family(values: Tensor) -> dict[str, float]:
        return dict(zip(names, values.tolist(), strict=True))

    return {
        "merger": "r2m",
        "families": names,
        "hyperparameters": {
            "k": knobs.k,
            "center": knobs.center,
            "block_weight": knobs.block_weight,
            "rank_ratio": float(knobs.rank_ratio),
            "svd": knobs.svd,
            "eta_mode": knobs.eta_mode,
            "eta": float(knobs.eta),
            "alpha": float(knobs.alpha),
            "norm_matching": knobs.norm_matching,
            "truncation": knobs.truncation,
        },
        "spectrum": subspace.eigenvalues.tolist(),  # eigenvalues of G, descending
        "core_rank": subspace.rank,
        "core_weights": by_family(subspace.weights),  # w: τ_core = Aᵀ w on L
        # share of each (γ-weighted, centred if `center`) row of A in the real subspace, from G alone
        "subspace_fraction": by_family(torch.where(row_energy > 0, captured / row_energy.clamp_min(1e-300), 0.0)),
        # ⟨τᵢ, τ_core⟩² / (‖τᵢ‖²‖τ_core‖²): the fraction of ‖τᵢ‖² along the core, over all keys
        "core_fraction": by_family(
            torch.where(denominator > 0, second.core_dot.square() / denominator.clamp_min(1e-300), 0.0)
        ),
        "task_vector_norms": by_family(task_norms),
        "task_vector_cosines": cosines_from_gram(first.task_gram),
        "core_norm": plan.core_norm,
        "residual_norms_before": by_family(second.norm_sq_before.clamp_min(0).sqrt()),
        "residual_norms_after": by_family(residual_norms),
        "residual_scales": by_family(plan.scales * n),  # m/nᵢ (1 without norm matching), 0 for a zero residual
        "residual_norm": plan.residual_norm,  # ‖τ_res‖ before η
        "eta": plan.eta,
        "near_cancellation": plan.near_cancellation,  # eta_mode=relative with ‖τ_res‖ < NEAR_CANCELLATION·‖τ_core‖
        "kept_rank": dict(second.kept_rank),
        "n_keys": n_keys,
        "n_active_keys": len(first.active),
        "n_core_keys": len(first.core_keys),
        "n_matrix_keys": len(second.kept_rank),  # matrix keys that went through step 5
        "timings_s": dict(plan.timings),
    }


def merge(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    heads: Mapping[str, Mapping[str, Tensor]],
    knobs: R2M,
) -> MergeResult:
    """R²M with checked ``knobs`` (`R2M`): θ₀ + τ_core + η·τ_res (module docstring); three streaming passes."""
    start = time.perf_counter()
    plan = _decompose(theta0, specialists, heads, knobs)
    lap = time.perf_counter()
    backbone = _pass3(theta0, specialists, plan.names, plan)
    plan.timings["pass3_combine"] = time.perf_counter() - lap
    plan.timings["total"] = time.perf_counter() - start
    return MergeResult(
        backbone=backbone, head=average_heads(heads), diagnostics=_diagnostics(plan, knobs, len(backbone))
    )


# -------------------------------------------------------------------------------------------- components (analysis)


@dataclass
class Components:
    """R²M's parts for analysis (`components`): θ* = θ₀ + core + eta·residual on the active keys, θ₀ elsewhere.

    core, residual: τ_core and τ_res (before η) per active floating key, float64, θ₀'s shapes, on θ₀'s device; the
    keys whose τ is zero in every specialist (and non-floating buffers) are absent. eta: the η the knobs resolve
    to. spectra: for every matrix key, the singular values of each specialist's residual rᵢ = τᵢ − τ_core before
    and after the rank truncation, (N, B, min(m, n)) float64 each (B = 3 for a fused qkv), descending; empty unless
    asked for. diagnostics: the merge card's facts (`merge` reports the same ones).
    """

    names: list[str]
    core: dict[str, Tensor]
    residual: dict[str, Tensor]
    eta: float
    spectra: dict[str, tuple[Tensor, Tensor]]
    diagnostics: dict[str, Any]

    def backbone(self, theta0: StateDict, eta: float | None = None) -> dict[str, Tensor]:
        """θ₀ + τ_core + η·τ_res with θ₀'s keys and dtypes (η = the knobs' own by default); with the knobs' η this
        is `merge`'s backbone bit for bit."""
        eta = self.eta if eta is None else float(eta)
        return {
            key: apply_delta(theta0[key], self.core[key] + eta * self.residual[key])
            if key in self.core
            else theta0[key].clone()
            for key in theta0
        }


def components(
    theta0: StateDict, specialists: Mapping[str, StateDict], knobs: R2M, spectra: bool = False
) -> Components:
    """R²M's intermediate results, the same computation as `merge` up to its last sum: τ_core and τ_res per key.

    Holds two float64 backbones (core and residual), unlike `merge`, which streams them into θ*. With ``spectra``
    the residual singular values before and after truncation are computed per matrix key (one float64 SVD of each
    rᵢ block and of each r̂ᵢ block: slow on a ViT-L on a CPU, seconds on a GPU).
    """
    plan = _decompose(theta0, specialists, None, knobs)
    names, n = plan.names, len(plan.names)
    core, residual, singular = {}, {}, {}
    for key in plan.first.active:
        factors = plan.second.factors.get(key)
        reference, flat, key_core_flat, key_residual = _key_parts(theta0, specialists, names, key, plan, True)
        core[key] = key_core_flat.reshape(reference.shape)
        residual[key] = key_residual.reshape(reference.shape)
        if spectra and is_matrix_key(key) and reference.ndim == 2:
            before = torch.linalg.svdvals(matrix_blocks(key, (flat - key_core_flat).reshape(n, *reference.shape)))
            if factors is None:  # ρ = 1 or truncation off: r̂ᵢ = rᵢ
                after = before
            else:
                us, vh = factors
                truncated = us if vh is None else us @ vh  # (N, B, m, n)
                after = torch.linalg.svdvals(truncated.to(torch.float64))
            singular[key] = (before.cpu(), after.cpu())
        plan.second.factors.pop(key, None)
    return Components(names, core, residual, plan.eta, singular, _diagnostics(plan, knobs, len(theta0)))
