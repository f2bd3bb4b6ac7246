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

Streaming, exact global threshold (D can be 3·10⁸, so τ is never concatenated). On the CPU (`bracket_thresholds`):
a systematic sample of about 2²⁰ entries per task (runs of 16, weighted) brackets the k-th largest magnitude between
two float32 values lᵢ ≤ hᵢ; one pass over every key in cache-sized chunks computes |θᵢ − θ₀| in float32, counts the
entries above hᵢ and gathers those inside [lᵢ, hᵢ] with their exact float64 magnitudes (0.3 % of D at ViT-L/14,
density 0.2); the threshold is the (k − count above)-th largest gathered value. Rounding to float32 never reverses
two magnitudes, so the split is exact; a bracket that misses the k-th value (or reaches 0) falls back to the
histogram route, and the diagnostics say which route ran (`threshold_method`). The histogram route
(`histogram_thresholds`; on a GPU, and for DARE's transformed vectors): |τ| ≥ 0 is a float64 whose IEEE bit pattern,
read as an int64, orders like its value; pass 1 histograms the top 19 bits of that pattern (11 exponent bits, 8
mantissa bits: 2¹⁹ bins, each 1/256 of an octave wide) per task, with exact int64 counts; pass 2 gathers the entries
of the bin that holds the k-th largest value and takes the exact (k − count above)-th largest among them.
The merge pass then trims with those thresholds and merges, key by key, each key in cache-sized chunks of its
flattened entries (task_vectors.merge_keys, elementwise: trimming, election and the disjoint merge only look across
tasks), without per-entry branches (`trim`, `elect_and_merge`); the few entries whose elected sign is 0 remember
their positive-sign value and are patched once the majority sign is known at the end of the pass. Each specialist is
opened three times per key (sample, threshold pass, merge; the histogram route: both of its passes and the merge, a
key nobody changed only twice; once with `trim_scope="per_tensor"`, where every threshold is local to its key).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from r2m_lab.mergers.contract import Knobs
from r2m_lab.mergers.task_vectors import (
    ELEMENTWISE_CHUNK,
    MergeResult,
    PhaseTimer,
    average_heads,
    check_choice,
    check_heads,
    check_keys,
    cpu_tensors,
    family_names,
    is_finite_number,
    iter_task_vectors,
    merge_diagnostics,
    merge_keys,
    read_task_vectors,
)

log = logging.getLogger(__name__)

TRIM_SCOPES = ("global", "per_tensor")
MERGE_FNS = ("disjoint_mean", "sum")

# float64 bits 62..44 (bit 63, the sign, is 0 for a magnitude): exponent and the top 8 mantissa bits.
BIN_SHIFT = 44
N_BINS = 1 << (63 - BIN_SHIFT)

# The bracket route (`bracket_thresholds`): a systematic sample of runs of SAMPLE_RUN consecutive entries (64 bytes of
# float32: one cache line), about SAMPLE_TARGET entries per task (every entry when D is smaller), and a bracket of
# relative half-width δ = max(BRACKET_MIN_WIDTH, BRACKET_Z·√((1 − p)/(runs·p))) around the k-th rank (p = k/D): the
# binomial error of a sampled rank, counted in runs rather than entries since neighbours are correlated. It gathers
# ≈ 2·δ·k entries per task.
SAMPLE_RUN = 16
SAMPLE_TARGET = 1 << 20
BRACKET_Z = 4.0
BRACKET_MIN_WIDTH = 0.005
GATHER_CAPACITY = 2.5  # × δ·k: the first size of the buffer that holds the gathered values (≈ 2·δ·k expected)

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
    gathered: list[int] = field(default_factory=list)  # entries gathered per task around the k-th value
    method: str = "histogram"  # "bracket" (sampled bracket, one chunked pass) or "histogram" (two float64 passes)


def global_thresholds(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    names: Sequence[str],
    density: float,
    transform: Transform | None = None,
) -> GlobalThresholds:
    """tᵢ = the k-th largest |τᵢ| over every floating entry of θ₀, exactly (module docstring).

    On the CPU without a transform: a sampled bracket and one chunked pass (`bracket_thresholds`), falling back to
    the histogram passes when the bracket misses; otherwise the histogram passes (`histogram_thresholds`). Both give
    the same thresholds; ``method`` says which ran. ``transform``: see `histogram_thresholds`.
    """
    found = bracket_thresholds(theta0, specialists, names, density) if transform is None else None
    return found if found is not None else histogram_thresholds(theta0, specialists, names, density, transform)


def histogram_thresholds(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    names: Sequence[str],
    density: float,
    transform: Transform | None = None,
) -> GlobalThresholds:
    """The thresholds in two streaming passes over whole keys in float64: the bit-pattern histogram, then the k-th
    value's bin (module docstring). Any device.

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
        return GlobalThresholds(torch.zeros(n, dtype=torch.float64), k, entries, [0] * n, "histogram")
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
    return GlobalThresholds(torch.tensor(thresholds, dtype=torch.float64), k, entries, sizes, "histogram")


def sample_magnitudes(
    theta0: StateDict, specialists: Mapping[str, StateDict], names: Sequence[str], keys: Sequence[str], stride: int
) -> tuple[Tensor, Tensor]:
    """A systematic sample of |τᵢ| over the given keys, exact in float64, with the weight each sampled entry stands for.

    From every ``stride`` consecutive entries of a flattened key the first SAMPLE_RUN are taken (stride = SAMPLE_RUN
    takes everything), and the key's remainder contributes its first SAMPLE_RUN; each sampled entry weighs (entries
    it stands for) / (entries taken), so a weighted quantile estimates the quantile of all D entries without bias
    (small keys, whole in the sample, weigh 1). Returns (N, m) float64 magnitudes and (m,) float64 weights.
    """
    magnitudes, weights = [], []
    for key in keys:
        reference = theta0[key].reshape(-1)
        rows = [reference, *(tensor.reshape(-1) for tensor in cpu_tensors(theta0, specialists, names, key))]
        size = reference.numel()
        full = size // stride * stride
        runs = [row[:full].view(-1, stride)[:, :SAMPLE_RUN].reshape(-1) for row in rows]  # (full/stride·SAMPLE_RUN,)
        run_weights = [torch.full((runs[0].numel(),), stride / SAMPLE_RUN, dtype=torch.float64)]
        if size > full:
            tail = min(SAMPLE_RUN, size - full)
            runs = [torch.cat([run, row[full : full + tail]]) for run, row in zip(runs, rows, strict=True)]
            run_weights.append(torch.full((tail,), (size - full) / tail, dtype=torch.float64))
        reference_run = runs[0].to(torch.float64)
        magnitudes.append(torch.stack([(run.to(torch.float64) - reference_run).abs() for run in runs[1:]]))
        weights.append(torch.cat(run_weights))
    return torch.cat(magnitudes, dim=1), torch.cat(weights)


def bracket_thresholds(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    names: Sequence[str],
    density: float,
) -> GlobalThresholds | None:
    """The exact thresholds from a sampled bracket and one chunked float32 pass; None where θ₀ is not on the CPU, at
    density 1, or where the bracket misses (logged: the histogram route then takes over, exact and slower).

    1. `sample_magnitudes` estimates, per task, the magnitudes lᵢ ≤ hᵢ whose weighted ranks from the top are
       k·(1 ± δ) (float32 values; δ: the comment above SAMPLE_RUN).
    2. One pass over every floating key in (N, ELEMENTWISE_CHUNK) chunks computes aᵢ = |θᵢ − θ₀| in float32 (the
       difference rounded once: 16-bit weights are widened first) and counts
       the entries above hᵢ; the entries with lᵢ ≤ aᵢ ≤ hᵢ are gathered with their exact float64 |τᵢ|.
    3. tᵢ = the (k − above)-th largest gathered value, provided 1 ≤ k − above ≤ gathered (else None: the caller
       falls back to the histogram).
    Why it is exact: aᵢ = r(|x|) and the float64 |τᵢ| = r₆₄(|x|) for the exact difference x and two roundings that
    never decrease, so an entry with aᵢ > hᵢ has a larger x than any gathered one (whose aᵢ ≤ hᵢ) and a float64
    magnitude at least as large; below lᵢ likewise. Counting and gathering by aᵢ therefore splits the float64
    magnitudes at the same ranks. NaN/inf make every comparison false: the merge pass names the tensor.
    """
    floating = {key: (value.numel(), value.device.type) for key, value in theta0.items() if value.is_floating_point()}
    if {device for _, device in floating.values()} != {"cpu"}:  # a GPU merge: whole keys suit it (histogram)
        return None
    keys = list(floating)
    entries = sum(size for size, _ in floating.values())
    n = len(names)
    k = kept_count(density, entries)
    if k >= entries:  # density 1 (or D tiny): the threshold is the smallest magnitude, often 0; the histogram has it
        return None
    stride = SAMPLE_RUN * max(1, entries // SAMPLE_TARGET)  # ≈ SAMPLE_TARGET entries sampled per task
    sample, weights = sample_magnitudes(theta0, specialists, names, keys, stride)  # (N, m), (m,)
    fraction = k / entries
    width = max(BRACKET_MIN_WIDTH, BRACKET_Z * math.sqrt((1 - fraction) / (sample.shape[1] / SAMPLE_RUN * fraction)))
    order = sample.argsort(dim=1, descending=True)  # (N, m)
    from_top = weights[order].cumsum(1)  # (N, m): entries the top j+1 sampled values stand for
    ranks = torch.tensor([k * (1 - width), k * (1 + width)], dtype=torch.float64)  # the ranks of hᵢ, lᵢ
    position = torch.stack([torch.searchsorted(from_top[i], ranks) for i in range(n)])  # (N, 2)
    position = position.clamp_max(sample.shape[1] - 1)
    bounds = sample.gather(1, order.gather(1, position)).to(torch.float32)  # (N, 2): hᵢ, lᵢ
    high, low = bounds[:, :1].contiguous(), bounds[:, 1:].contiguous()  # (N, 1) float32
    if not bool((low > 0).all()):  # a bracket reaching 0 would gather every unchanged entry
        log.info("TIES thresholds: the sampled bracket reaches 0 (most entries unchanged): histogram route instead")
        return None
    above = torch.zeros(n, dtype=torch.int64)
    # The gathered values go into one preallocated buffer per task (sized for the ≈ 2·δ·k expected, doubled if ties
    # overflow it) rather than a small tensor per chunk: thousands of small long-lived blocks between the per-key
    # temporaries fragmented the heap, and the peak RSS of identical runs spread from 1.4 to 5.4 GB (ViT-L/14).
    capacity = int(GATHER_CAPACITY * width * k) + ELEMENTWISE_CHUNK
    gathered = [torch.empty(capacity, dtype=torch.float64) for _ in range(n)]
    filled = [0] * n
    buffer = torch.empty(n, ELEMENTWISE_CHUNK, dtype=torch.float32)
    for key in keys:
        reference = theta0[key].reshape(-1)
        flats = [tensor.reshape(-1) for tensor in cpu_tensors(theta0, specialists, names, key)]
        size = reference.numel()
        wide = reference.dtype in (torch.float32, torch.float64)
        for start in range(0, size, ELEMENTWISE_CHUNK):
            stop = min(size, start + ELEMENTWISE_CHUNK)
            magnitudes = buffer[:, : stop - start]  # (N, c) float32
            if wide:  # float32/float64 weights: the difference rounded once to float32
                for row, flat in zip(magnitudes, flats, strict=True):
                    torch.sub(flat[start:stop], reference[start:stop], out=row)
            else:  # 16-bit weights: subtracting in their own precision would round too coarsely for the bracket
                base = reference[start:stop].to(torch.float32)
                for row, flat in zip(magnitudes, flats, strict=True):
                    row.copy_(flat[start:stop]).sub_(base)
            magnitudes.abs_()
            over = magnitudes > high  # (N, c)
            inside = torch.logical_xor(magnitudes >= low, over)  # low ≤ a ≤ high (a > high implies a ≥ low)
            above += torch.count_nonzero(over, dim=1)
            # one nonzero for the whole chunk (rows come out in order): measured 5× cheaper than a masked_select
            # per task for the values and one for θ₀
            task, column = inside.nonzero().unbind(1)  # (M,), (M,)
            counts = torch.bincount(task, minlength=n).tolist()
            for i, positions in enumerate(column.add_(start).split(counts)):
                if not positions.numel():
                    continue
                if filled[i] + positions.numel() > gathered[i].numel():  # more ties than expected: double
                    grown = torch.empty(2 * gathered[i].numel() + positions.numel(), dtype=torch.float64)
                    grown[: filled[i]] = gathered[i][: filled[i]]
                    gathered[i] = grown
                exact = gathered[i][filled[i] : filled[i] + positions.numel()]
                exact.copy_(flats[i].index_select(0, positions))
                exact.sub_(reference.index_select(0, positions).to(torch.float64)).abs_()
                filled[i] += positions.numel()
    thresholds, sizes = [], []
    for i in range(n):
        values = gathered[i][: filled[i]]
        need = k - int(above[i])
        if not 1 <= need <= values.numel():
            log.info(
                "TIES thresholds: the sampled bracket missed %s's k-th value (k %d, %d above, %d inside): histogram "
                "route instead (exact, one more pass)",
                names[i], k, int(above[i]), values.numel(),
            )  # fmt: skip
            return None
        # the need-th largest = the (m − need + 1)-th smallest: kthvalue's selection, ~4× faster than topk's here
        thresholds.append(float(torch.kthvalue(values, values.numel() - need + 1).values))
        sizes.append(values.numel())
    return GlobalThresholds(torch.tensor(thresholds, dtype=torch.float64), k, entries, sizes, "bracket")


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
    """τ̂ᵢ = τᵢ where |τᵢ| ≥ tᵢ, else 0: (N, *shape) with thresholds (N,).

    A product with the 0/1 mask rather than torch.where: where branches per entry, and on a random 20 % mask it was
    measured ~10× slower than the compare and the product (N = 3, 65 536 entries, CPU). The in-place compare writes
    the mask as 1.0/0.0 in τ's dtype, so no bool tensor is cast. τ·1 = τ and τ·0 = ±0 exactly; a −0 is a zero to
    every later step.
    """
    t = thresholds.to(device=taus.device, dtype=taus.dtype).reshape(-1, *([1] * (taus.ndim - 1)))
    return taus.abs().ge_(t).mul_(taus)


def elect_and_merge(
    trimmed: Tensor, merge_fn: str, stats: TrimStats | None = None, key: str | None = None, offset: int = 0
) -> Tensor:
    """Steps 2-3 on one key: (N, *shape) trimmed task vectors -> (*shape) merged τ* (before λ).

    γ = sign(Σᵢ τ̂ᵢ); τ* keeps the positive values where γ > 0 and the negative ones elsewhere (γ < 0, or an
    unresolved γ = 0), the TIES authors' selection rule, and a zero τ̂ᵢ is never selected. Computed without
    branches: P = Σᵢ max(τ̂ᵢ, 0) and M = Σᵢ min(τ̂ᵢ, 0) add the selected values in task order with zeros between,
    so they are bit for bit the sums over the selected tasks; their counts come from the signs (exact small integers
    in float64); τ* = P/n₊·[γ > 0] + M/n₋·[γ ≤ 0], where one product is an exact zero.

    Where Σᵢ τ̂ᵢ = 0 exactly the sign is not known yet (the majority of the whole task vector decides it): the value
    returned there is the negative-sign one, and with ``stats`` and ``key`` the positive-sign one is stored in
    ``stats.undecided[key]`` for `ties_merge` to patch in once the majority is known. ``trimmed`` may be a chunk
    (N, c) of the flattened key starting at entry ``offset``: the stored indices are the key's flat indices.
    """
    total = trimmed.sum(0)  # (*shape): Σᵢ τ̂ᵢ, whose sign is γ
    up = (total > 0).to(trimmed.dtype)  # [γ > 0]
    positive_value = trimmed.clamp_min(0).sum(0)  # P
    negative_value = trimmed.clamp_max(0).sum(0)  # M
    if merge_fn != "sum" or stats is not None:
        signs = trimmed.sign()  # (N, *shape) in {−1, 0, 1}
        balance = signs.sum(0)  # n₊ − n₋
        present = signs.abs_()  # [τ̂ᵢ ≠ 0]
        nonzero = present.sum(0)  # n₊ + n₋
        n_positive, n_negative = (nonzero + balance).mul_(0.5), (nonzero - balance).mul_(0.5)
        if merge_fn != "sum":
            positive_value = positive_value.div_(n_positive.clamp_min(1))
            negative_value = negative_value.div_(n_negative.clamp_min(1))
    merged = (positive_value * up).add_(negative_value.mul_(1 - up))
    if stats is not None:
        n = trimmed.shape[0]
        stats.kept += present.reshape(n, -1).sum(1).to(device="cpu", dtype=torch.int64)
        support = int(torch.count_nonzero(nonzero))  # entries where some τ̂ᵢ is non-zero
        positive, negative = int(torch.count_nonzero(up)), int(torch.count_nonzero(total < 0))
        stats.support += support
        stats.conflicts += int(torch.count_nonzero(n_positive * n_negative))  # both signs among the τ̂ᵢ
        stats.positive += positive
        stats.negative += negative
        # a supported entry has Σᵢ τ̂ᵢ > 0, < 0 or = 0; an unsupported one sums to 0: the rest are the undecided ones
        if key is not None and support > positive + negative:
            index = ((total == 0) & (nonzero > 0)).reshape(-1).nonzero().squeeze(1)  # (U,)
            positive_sign = (positive_value.reshape(-1)[index]).cpu()  # τ* there if γ = +1
            index = index.cpu() + offset
            if key in stats.undecided:  # an earlier chunk of this key had some too
                earlier_index, earlier_positive = stats.undecided[key]
                index, positive_sign = torch.cat([earlier_index, index]), torch.cat([earlier_positive, positive_sign])
            stats.undecided[key] = (index, positive_sign)
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
            "threshold_method": found.method,  # "bracket" or "histogram" (global_thresholds)
            "threshold_gathered_entries": dict(zip(names, found.gathered, strict=True)),
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
