"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(arXiv 2306.01708). With task vectors τᵢ = θᵢ − θ₀ (i = 1..N), each flattened over the WHOLE backbone (D entries):

1. trim      tᵢ = the k-th largest |τᵢ| over all D entries, k = max(1, ⌊density·D⌋);  τ̂ᵢ = τᵢ · [|τᵢ| ≥ tᵢ]
             (`trim_scope="global"`, the paper's reading: one threshold per task; `"per_tensor"`: one per task and
             key, k = max(1, ⌊density·Pˡ⌋) over that key's Pˡ entries, as several public re-implementations do)
2. elect     γ = sign(Σᵢ τ̂ᵢ) per entry
3. merge     Aₚ = {i : sign(τ̂ᵢₚ) = γₚ};  τ*ₚ = (1/|Aₚ|) Σ_{i∈Aₚ} τ̂ᵢₚ  (`merge_fn="disjoint_mean"`), or the disjoint sum
             Σ_{i∈Aₚ} τ̂ᵢₚ (`merge_fn="sum"`)
4.           θ* = θ₀ + λ·τ*, heads averaged. density is a fraction in (0, 1], never a percent (defaults in
             conf/merger/ties.yaml: density 0.2, λ 1.0).

Decided here (the paper is silent):
- ties at the threshold: every entry with |τᵢ| = tᵢ is kept, so a task keeps at least k entries and more when
  several share the k-th magnitude (`kept_fraction` in the diagnostics says how many). If fewer than k entries are
  non-zero, tᵢ = 0 and every non-zero entry is kept.
- an entry whose trimmed values sum to exactly zero (e.g. +a and −a) has no elected sign and merges to 0.
- D counts every floating entry of θ₀, including keys no specialist changed (their τ is 0).

Streaming, exact global threshold (D can be 3·10⁸, so τ is never concatenated): |τ| ≥ 0 is a float64 whose IEEE bit
pattern, read as an int64, orders like its value. Pass 1 histograms the top 19 bits of that pattern (11 exponent
bits, 8 mantissa bits: 2¹⁹ bins, each 1/256 of an octave wide) per task, with exact int64 counts; the bin that holds
the k-th largest value follows from the cumulative counts from the top. Pass 2 gathers only the entries that fall in
that bin (≈0.3 % of D for fine-tune-like magnitudes) and takes the exact (k − count above)-th largest among them.
Pass 3 trims with those thresholds and merges, key by key. Each specialist is read three times (once with
`trim_scope="per_tensor"`, where every threshold is local to its key).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from r2m_lab.mergers.contract import Knobs
from r2m_lab.mergers.task_vectors import (
    MergeResult,
    PhaseTimer,
    average_heads,
    check_choice,
    check_heads,
    check_keys,
    family_names,
    is_finite_number,
    iter_task_vectors,
    merge_diagnostics,
    merge_keys,
    read_task_vectors,
)

TRIM_SCOPES = ("global", "per_tensor")
MERGE_FNS = ("disjoint_mean", "sum")

# float64 bits 62..44 (bit 63, the sign, is 0 for a magnitude): exponent and the top 8 mantissa bits.
BIN_SHIFT = 44
N_BINS = 1 << (63 - BIN_SHIFT)

StateDict = Mapping[str, Tensor]
# Rewrites one key's task-vector stack before trimming: (key, (N, *shape) float64) -> (N, *shape) float64 (DARE).
Transform = Callable[[str, Tensor], Tensor]


@dataclass(frozen=True)
class TIES(Knobs):
    """TIES-Merging (module docstring). density: fraction of each task vector kept, in (0, 1]. lam: λ. trim_scope:
    "global" (one threshold per task over the whole task vector, the paper) or "per_tensor". merge_fn:
    "disjoint_mean" (the paper) or "sum"."""

    density: float
    lam: float
    trim_scope: str
    merge_fn: str

    def check(self, n_tasks: int | None = None) -> None:
        """Refuse out-of-range knobs before any work."""
        if not is_finite_number(self.density) or not 0 < self.density <= 1:
            raise ValueError(f"density must be a fraction in (0, 1] (0.2 keeps the top 20 %), got {self.density!r}")
        if not is_finite_number(self.lam):
            raise ValueError(f"lam must be a finite number, got {self.lam!r}")
        check_choice("trim_scope", self.trim_scope, TRIM_SCOPES)
        check_choice("merge_fn", self.merge_fn, MERGE_FNS)

    def __call__(
        self, theta0: StateDict, specialists: Mapping[str, StateDict], heads: Mapping[str, Mapping[str, Tensor]]
    ) -> MergeResult:
        """θ₀ + λ·disjoint_merge(elect(trim(τ))), heads averaged (`merge`)."""
        return merge(theta0, specialists, heads, self)


# --------------------------------------------------------------------------------------------------- thresholds


def kept_count(density: float, entries: int) -> int:
    """k = max(1, ⌊density·D⌋); the 1e-9 guards ⌊0.29·100⌋ against 28.999999999999996."""
    return max(1, math.floor(density * entries + 1e-9))


def magnitude_bins(magnitudes: Tensor) -> Tensor:
    """Histogram bin of each non-negative finite float64 magnitude (int64 in [0, N_BINS)), monotone in the value."""
    return magnitudes.contiguous().view(torch.int64) >> BIN_SHIFT


@dataclass
class GlobalThresholds:
    """The exact per-task trim thresholds over the whole task vector, and how they were found."""

    thresholds: Tensor  # (N,) float64: tᵢ, the k-th largest |τᵢ|
    k: int  # entries each task keeps at least
    entries: int  # D: floating entries of θ₀
    gathered: list[int] = field(default_factory=list)  # entries pass 2 gathered per task (the k-th value's bin)
    active: list[str] = field(default_factory=list)  # floating keys with some non-zero τ, in θ₀'s order


def global_thresholds(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    names: Sequence[str],
    density: float,
    transform: Transform | None = None,
) -> GlobalThresholds:
    """tᵢ = the k-th largest |τᵢ| over every floating entry of θ₀, exactly, in two streaming passes (module docstring).

    ``transform`` rewrites each key's stack first (DARE's drop-and-rescale), so the threshold is that of the
    transformed task vector; it must give the same result every time it is called for a key.
    """
    n = len(names)
    counts: Tensor | None = None  # (N, N_BINS) int64: exact whatever D
    entries, zero_entries = 0, 0  # zero_entries: entries of keys no specialist changed, all in bin 0
    active = []
    for key, _, taus in iter_task_vectors(theta0, specialists, names):
        if taus is None:
            continue
        size = taus[0].numel()
        entries += size
        if not taus.any():
            zero_entries += size
            continue
        active.append(key)
        magnitudes = (transform(key, taus) if transform else taus).reshape(n, -1).abs()
        offsets = torch.arange(n, device=magnitudes.device)[:, None] * N_BINS
        key_counts = torch.bincount((magnitude_bins(magnitudes) + offsets).reshape(-1), minlength=n * N_BINS)
        counts = key_counts.reshape(n, N_BINS) if counts is None else counts + key_counts.reshape(n, N_BINS)
    if entries == 0:
        raise ValueError("theta0 has no floating-point keys: there is nothing to trim")
    k = kept_count(density, entries)
    if counts is None:  # every τ is zero: every threshold is 0 and nothing is trimmed
        return GlobalThresholds(torch.zeros(n, dtype=torch.float64), k, entries, [0] * n, active)
    counts = counts.cpu()
    counts[:, 0] += zero_entries
    from_top = counts.flip(1).cumsum(1)  # (N, N_BINS): entries in the top j+1 bins
    position = torch.searchsorted(from_top, torch.full((n, 1), k, dtype=from_top.dtype)).squeeze(1)  # (N,)
    target = (N_BINS - 1 - position).tolist()  # the bin of the k-th largest value, per task
    above = [int(from_top[i, position[i]] - counts[i, target[i]]) for i in range(n)]
    need = [k - above[i] for i in range(n)]  # rank of the k-th value inside its bin, 1 ≤ need ≤ count
    # Entries of unchanged keys are zeros in bin 0: never gathered, they can only be the smallest of that bin.
    gathered: list[list[Tensor]] = [[] for _ in range(n)]
    for key in active:
        _, taus = read_task_vectors(theta0, specialists, names, key)
        magnitudes = (transform(key, taus) if transform else taus).reshape(n, -1).abs()
        bins = magnitude_bins(magnitudes)
        for i in range(n):
            gathered[i].append(magnitudes[i][bins[i] == target[i]].cpu())
    thresholds, sizes = [], []
    for i in range(n):
        values = torch.cat(gathered[i])
        sizes.append(values.numel())
        # need > gathered: the k-th value is one of the unchanged keys' zeros (then target is bin 0)
        kth = float(torch.topk(values, need[i]).values[-1]) if need[i] <= values.numel() else 0.0
        thresholds.append(kth)
    return GlobalThresholds(torch.tensor(thresholds, dtype=torch.float64), k, entries, sizes, active)


def per_tensor_thresholds(taus: Tensor, density: float) -> Tensor:
    """One key's thresholds: the k-th largest |τᵢ| over its P entries, k = max(1, ⌊density·P⌋); (N, *shape) -> (N,)."""
    flat = taus.reshape(taus.shape[0], -1).abs()
    return torch.topk(flat, kept_count(density, flat.shape[1]), dim=1).values[:, -1]


# ------------------------------------------------------------------------------------------------------ merging


@dataclass
class TrimStats:
    """Counts accumulated while merging (over every key), for the diagnostics."""

    kept: Tensor  # (N,) int64: non-zero entries that survive trimming, per task
    support: int = 0  # entries where some trimmed τ̂ᵢ is non-zero
    conflicts: int = 0  # entries where the trimmed values have both signs


def trim(taus: Tensor, thresholds: Tensor) -> Tensor:
    """τ̂ᵢ = τᵢ where |τᵢ| ≥ tᵢ, else 0: (N, *shape) with thresholds (N,)."""
    t = thresholds.to(device=taus.device, dtype=taus.dtype).reshape(-1, *([1] * (taus.ndim - 1)))
    return torch.where(taus.abs() >= t, taus, 0.0)


def elect_and_merge(trimmed: Tensor, merge_fn: str, stats: TrimStats | None = None) -> Tensor:
    """Steps 2-3 on one key: (N, *shape) trimmed task vectors -> (*shape) merged τ* (before λ)."""
    signs = torch.sign(trimmed)
    elected = torch.sign(trimmed.sum(0))  # 0 where the trimmed values cancel exactly: that entry merges to 0
    agree = (signs == elected) & (elected != 0)  # (N, *shape); a zero τ̂ᵢ (sign 0) never agrees
    total = torch.where(agree, trimmed, 0.0).sum(0)
    if stats is not None:
        stats.kept += (signs != 0).reshape(signs.shape[0], -1).sum(1).cpu()
        stats.support += int((signs != 0).any(0).sum())
        stats.conflicts += int(((signs > 0).any(0) & (signs < 0).any(0)).sum())
    if merge_fn == "sum":
        return total
    return total / agree.sum(0).clamp_min(1)


def ties_merge(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    heads: Mapping[str, Mapping[str, Tensor]],
    *,
    density: float,
    lam: float,
    trim_scope: str,
    merge_fn: str,
    transform: Transform | None = None,
    merger: str = "ties",
    hyperparameters: Mapping[str, Any] | None = None,
) -> tuple[MergeResult, TrimStats]:
    """TIES on the (optionally transformed) task vectors; DARE with ``combine="ties"`` calls this with its mask.

    Knobs are not validated here (the public merge functions do it). Returns the result and the trim counts.
    """
    names = family_names(specialists)
    check_keys(theta0, specialists)
    check_heads(heads, names)
    n = len(names)
    timer = PhaseTimer()
    stats = TrimStats(torch.zeros(n, dtype=torch.int64))
    facts: dict[str, Any] = {}
    if trim_scope == "global":
        found = global_thresholds(theta0, specialists, names, density, transform)
        timer.tick("thresholds")
        thresholds = found.thresholds
        entries = found.entries
        facts = {
            "k": found.k,
            "thresholds": dict(zip(names, thresholds.tolist(), strict=True)),
            "threshold_bin_entries": dict(zip(names, found.gathered, strict=True)),
        }

        def key_thresholds(taus: Tensor) -> Tensor:
            return thresholds

    else:
        per_key: dict[str, dict[str, float]] = {}
        entries = sum(v.numel() for v in theta0.values() if v.is_floating_point())
        facts = {"thresholds": per_key}

        def key_thresholds(taus: Tensor) -> Tensor:
            return per_tensor_thresholds(taus, density)

    def combine(key: str, taus: Tensor) -> Tensor:
        taus = transform(key, taus) if transform else taus
        t = key_thresholds(taus)
        if trim_scope == "per_tensor":
            per_key[key] = dict(zip(names, t.tolist(), strict=True))
        return lam * elect_and_merge(trim(taus, t), merge_fn, stats)

    streamed = merge_keys(theta0, specialists, names, combine)
    timer.tick("merge")
    hp = dict(hyperparameters) if hyperparameters is not None else {}
    hp.update(density=float(density), lam=float(lam), trim_scope=trim_scope, merge_fn=merge_fn)
    diagnostics = merge_diagnostics(
        merger, names, hp, streamed.task_gram, len(streamed.backbone), streamed.n_zero_keys, timer.timings
    )
    diagnostics.update(
        facts,
        entries=entries,
        # non-zero entries each task keeps, over D (≥ density when several entries share the k-th magnitude)
        kept_fraction=dict(zip(names, (stats.kept.to(torch.float64) / max(entries, 1)).tolist(), strict=True)),
        sign_conflict_fraction=stats.conflicts / stats.support if stats.support else 0.0,
    )
    return MergeResult(backbone=streamed.backbone, head=average_heads(heads), diagnostics=diagnostics), stats


def merge(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    heads: Mapping[str, Mapping[str, Tensor]],
    knobs: TIES,
) -> MergeResult:
    """TIES-Merging (module docstring) with checked ``knobs``: θ₀ + λ·disjoint_merge(elect(trim(τ))), heads averaged."""
    result, _ = ties_merge(
        theta0,
        specialists,
        heads,
        density=knobs.density,
        lam=float(knobs.lam),
        trim_scope=knobs.trim_scope,
        merge_fn=knobs.merge_fn,
    )
    return result
