"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(arXiv 2306.01708). With task vectors τᵢ = θᵢ − θ₀ (i = 1..N), each flattened over the WHOLE backbone (D entries):

1. trim      tᵢ = the k-th smallest |τᵢ| over all D entries, k = D − ⌊density·D⌋;  τ̂ᵢ = τᵢ · [|τᵢ| ≥ tᵢ]
             i.e. tᵢ is the (⌊density·D⌋ + 1)-th largest |τᵢ| and a task keeps ⌊density·D⌋ + 1 entries when no two
             magnitudes tie (τ = [1 … 10], density 0.2: keeps 8, 9, 10). density = 1 keeps everything (tᵢ = min|τᵢ|).
             (`trim_scope="global"`, the paper's reading: one threshold per task; `"per_tensor"`: one per task and
             key, the same rule over that key's Pˡ entries, as several public re-implementations do)
2. elect     γ = sign(Σᵢ τ̂ᵢ) per entry; where Σᵢ τ̂ᵢ = 0 exactly, γ = the majority sign, sign(Σ_entries γ), over the
             whole task vector (both trim scopes)
3. merge     Aₚ = {i : sign(τ̂ᵢₚ) = γₚ};  τ*ₚ = (1/|Aₚ|) Σ_{i∈Aₚ} τ̂ᵢₚ  (`merge_fn="disjoint_mean"`), or the disjoint sum
             Σ_{i∈Aₚ} τ̂ᵢₚ (`merge_fn="sum"`); an empty Aₚ gives 0
4.           θ* = θ₀ + λ·τ*, heads averaged. density is a fraction in (0, 1], never a percent (defaults in
             conf/merger/ties.yaml: density 0.2, λ 1.0).

Steps 1–3 follow the TIES authors' code (`topk_values_mask`, `resolve_sign` with "majority", `disjoint_merge`; the
same in fusion_bench) bit for bit on the same flattened task vectors:
- ⌊density·D⌋ is the floor of the float64 product, like their `int(d * K)` (so ⌊0.29·100⌋ = 28 there and here);
- ties at the threshold: every entry with |τᵢ| = tᵢ is kept (their `>=`), so a task keeps more than ⌊density·D⌋ + 1
  entries when several share the threshold magnitude (`kept_fraction` in the diagnostics says how many);
- an entry whose trimmed values sum to exactly zero (e.g. +a and −a) takes the majority sign; if the majority is
  itself a tie (as many positive as negative elected entries), their selection rule keeps the negative values there,
  and so does this module.
- D counts every floating entry of θ₀, including keys no specialist changed (their τ is 0).
Tests: tests/test_peer_agreement.py checks both scopes against a dense re-implementation of the authors' algorithm.

Streaming, exact global threshold (D can be 3·10⁸, so τ is never concatenated): |τ| ≥ 0 is a float64 whose IEEE bit
pattern, read as an int64, orders like its value. Pass 1 histograms the top 19 bits of that pattern (11 exponent
bits, 8 mantissa bits: 2¹⁹ bins, each 1/256 of an octave wide) per task, with exact int64 counts; the bin that holds
the k-th largest value follows from the cumulative counts from the top. Pass 2 gathers only the entries that fall in
that bin (≈0.3 % of D for fine-tune-like magnitudes) and takes the exact (k − count above)-th largest among them.
Pass 3 trims with those thresholds and merges, key by key, each key in cache-sized chunks of its flattened entries
(task_vectors.merge_keys, elementwise: trimming, election and the disjoint merge only look across tasks); the few
entries whose elected sign is 0 remember their positive-sign value and are patched once the majority sign is known at
the end of the pass. Each specialist is read
three times (once with `trim_scope="per_tensor"`, where every threshold is local to its key).
"""

from __future__ import annotations

import functools
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
    """How many of D magnitudes are at or above the threshold when none tie: min(D, ⌊density·D⌋ + 1).

    The threshold is then the kept_count-th largest magnitude = the (D − ⌊density·D⌋)-th smallest, the TIES authors'
    k. ⌊·⌋ is taken of the float64 product as their `int(d * K)` does (no rounding guard), so the counts agree with
    theirs bit for bit. density = 1 gives D: the threshold is the smallest magnitude and every entry is kept.
    """
    return min(entries, math.floor(density * entries) + 1)


def magnitude_bins(magnitudes: Tensor) -> Tensor:
    """Histogram bin of each non-negative finite float64 magnitude (int64 in [0, N_BINS)), monotone in the value."""
    return magnitudes.contiguous().view(torch.int64) >> BIN_SHIFT


@dataclass
class GlobalThresholds:
    """The exact per-task trim thresholds over the whole task vector, and how they were found."""

    thresholds: Tensor  # (N,) float64: tᵢ, the k-th largest |τᵢ|
    k: int  # entries each task keeps at least: ⌊density·D⌋ + 1 (at most D)
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
    """One key's thresholds: the k-th largest |τᵢ| of its P entries, k = kept_count(density, P); (N, *shape) -> (N,)."""
    flat = taus.reshape(taus.shape[0], -1).abs()
    return torch.topk(flat, kept_count(density, flat.shape[1]), dim=1).values[:, -1]


# ------------------------------------------------------------------------------------------------------ merging


@dataclass
class TrimStats:
    """Counts accumulated while merging (over every key), for the diagnostics and the majority sign."""

    kept: Tensor  # (N,) int64: non-zero entries that survive trimming, per task
    support: int = 0  # entries where some trimmed τ̂ᵢ is non-zero
    conflicts: int = 0  # entries where the trimmed values have both signs
    positive: int = 0  # entries whose elected sign sign(Σᵢ τ̂ᵢ) is +1
    negative: int = 0  # ... is −1
    # entries with some non-zero τ̂ᵢ whose Σᵢ τ̂ᵢ is exactly 0, by key: (flat indices, their τ* if γ = +1 (before λ))
    undecided: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def majority_sign(self) -> int:
        """sign(Σ_entries γ) over every entry merged so far: +1, −1, or 0 for a tie."""
        return (self.positive > self.negative) - (self.positive < self.negative)


def trim(taus: Tensor, thresholds: Tensor) -> Tensor:
    """τ̂ᵢ = τᵢ where |τᵢ| ≥ tᵢ, else 0: (N, *shape) with thresholds (N,)."""
    t = thresholds.to(device=taus.device, dtype=taus.dtype).reshape(-1, *([1] * (taus.ndim - 1)))
    return torch.where(taus.abs() >= t, taus, 0.0)


def _any_task(masks: Tensor) -> Tensor:
    """(N, *shape) bool -> (*shape): any over the task axis, as an OR of the N rows (measured at N = 3 on the CPU:
    ~40× faster than Tensor.any(0), a strided reduction over the leading axis)."""
    return functools.reduce(torch.logical_or, masks.unbind(0))


def disjoint_merge(
    trimmed: Tensor, elected: Tensor, merge_fn: str, positive: Tensor | None = None, negative: Tensor | None = None
) -> Tensor:
    """Step 3: (N, *shape) trimmed values, (*shape) elected sign -> (*shape) τ*.

    Keeps the positive values where γ > 0 and the negative ones elsewhere (γ < 0, or an unresolved γ = 0), the TIES
    authors' selection rule; a zero τ̂ᵢ is never selected. ``positive``, ``negative``: the masks trimmed > 0 and
    trimmed < 0 when the caller has them already.
    """
    positive = trimmed > 0 if positive is None else positive
    negative = trimmed < 0 if negative is None else negative
    selected = torch.where(elected > 0, positive, negative)  # (N, *shape)
    total = torch.where(selected, trimmed, 0.0).sum(0)
    if merge_fn == "sum":
        return total
    return total / selected.sum(0).clamp_min(1)


def elect_and_merge(
    trimmed: Tensor, merge_fn: str, stats: TrimStats | None = None, key: str | None = None, offset: int = 0
) -> Tensor:
    """Steps 2-3 on one key: (N, *shape) trimmed task vectors -> (*shape) merged τ* (before λ).

    Where Σᵢ τ̂ᵢ = 0 exactly the sign is not known yet (the majority of the whole task vector decides it): the value
    returned there is the negative-sign one, and with ``stats`` and ``key`` the positive-sign one is stored in
    ``stats.undecided[key]`` for `ties_merge` to patch in once the majority is known. ``trimmed`` may be a chunk
    (N, c) of the flattened key starting at entry ``offset``: the stored indices are the key's flat indices.
    """
    positive, negative = trimmed > 0, trimmed < 0  # (N, *shape); trimmed values are finite
    elected = torch.sign(trimmed.sum(0))
    merged = disjoint_merge(trimmed, elected, merge_fn, positive, negative)
    if stats is not None:
        any_positive, any_negative = _any_task(positive), _any_task(negative)  # (*shape)
        supported = any_positive | any_negative  # some τ̂ᵢ is non-zero
        stats.kept += (positive | negative).reshape(trimmed.shape[0], -1).sum(1).cpu()
        stats.support += int(supported.sum())
        stats.conflicts += int((any_positive & any_negative).sum())
        stats.positive += int((elected > 0).sum())
        stats.negative += int((elected < 0).sum())
        undecided = ((elected == 0) & supported).reshape(-1)
        if key is not None and bool(undecided.any()):
            index = undecided.nonzero().squeeze(1)  # (U,)
            flat = trimmed.reshape(trimmed.shape[0], -1)[:, index]  # (N, U)
            positive = disjoint_merge(flat, torch.ones(index.numel(), dtype=flat.dtype, device=flat.device), merge_fn)
            index, positive = index.cpu() + offset, positive.cpu()
            if key in stats.undecided:  # an earlier chunk of this key had some too
                earlier_index, earlier_positive = stats.undecided[key]
                index, positive = torch.cat([earlier_index, index]), torch.cat([earlier_positive, positive])
            stats.undecided[key] = (index, positive)
    return merged


def resolve_undecided(backbone: dict[str, Tensor], theta0: StateDict, stats: TrimStats, lam: float) -> int:
    """Give the entries whose Σᵢ τ̂ᵢ was exactly 0 the majority sign (in place); returns how many there were.

    Majority −1 or a tie: the negative-sign values `elect_and_merge` wrote stay. Majority +1: θ₀ + λ·(positive-sign
    value), rounded once to θ₀'s dtype like every other entry.
    """
    count = sum(int(index.numel()) for index, _ in stats.undecided.values())
    if stats.majority_sign > 0:
        for key, (index, positive) in stats.undecided.items():
            reference = theta0[key].reshape(-1)
            flat = backbone[key].view(-1)  # apply_delta's output is contiguous: a view, written in place
            index = index.to(flat.device)
            patched = reference[index].to(torch.float64) + lam * positive.to(device=flat.device, dtype=torch.float64)
            flat[index] = patched.to(flat.dtype)
    return count


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

    # With global thresholds and no transform, trimming, election and the disjoint merge are elementwise: the merge
    # pass then takes each key in cache-sized chunks (`merge_keys`), entry p of a chunk at flat index offset + p.
    elementwise = trim_scope == "global" and transform is None
    offsets: dict[str, int] = {}

    def combine(key: str, taus: Tensor) -> Tensor:
        taus = transform(key, taus) if transform else taus
        t = key_thresholds(taus)
        if trim_scope == "per_tensor":
            per_key[key] = dict(zip(names, t.tolist(), strict=True))
        offset = offsets.get(key, 0)
        offsets[key] = offset + taus[0].numel()
        return lam * elect_and_merge(trim(taus, t), merge_fn, stats, key, offset)

    streamed = merge_keys(theta0, specialists, names, combine, elementwise)
    zero_sign_entries = resolve_undecided(streamed.backbone, theta0, stats, lam)
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
        majority_sign=stats.majority_sign,  # the sign given to entries whose trimmed values cancel exactly
        zero_sign_entries=zero_sign_entries,  # how many such entries there were
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
