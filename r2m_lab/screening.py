"""Specialist screening before merging: flag a specialist whose task vector or head is an outlier among the others.

Merging strangers' checkpoints is how a poisoned one gets in (a detector fine-tuned with flipped labels, or one whose
task vector is scaled up so that it dominates a sum). `screen_specialists` reads θ₀ and the N specialists once, key
by key (a specialist may be a lazy mapping; the N×D task matrix is never formed), and reports per specialist:

- ``norm``: ‖τᵢ‖₂ over every floating key, and ``norm_ratio`` = ‖τᵢ‖ / median over ALL N specialists of ‖τⱼ‖
  (the median includes i itself: with N = 3 and one specialist scaled 10×, the median is an ordinary norm, while the
  median of the two others would be dragged halfway to the outlier and flag the ordinary ones too);
- ``mean_cosine``: the mean cosine of τᵢ to the other task vectors, and ``others_agreement`` = the median pairwise
  cosine among the others (how much the rest agree with each other without i);
- ``top_direction_share`` (and ``top_direction_ratio``, it over its median over all N): Σ σ₁(τᵢˡ)² / Σ ‖τᵢˡ‖²_F
  over the matrix keys l (a fused qkv as three d×d blocks): the
  share of the task vector's matrix energy in each matrix's top singular direction (1 for rank-one updates, ~1/r for
  isotropic noise). σ₁ comes from POWER_ITERATIONS power iterations from a fixed start (a lower bound on σ₁, exact
  to a few digits for fine-tune spectra): O(m·n) per matrix instead of an SVD. None without matrix keys;
- head statistics, if heads are given: ``head_direction`` = the fake-minus-real weight row W[1] − W[0] (logit 1 is
  P(fake)), ``head_cosine`` = its cosine to the mean direction of the other heads, ``head_agreement`` = the median
  pairwise cosine among the others' directions, and with a ``base_head`` (the head every specialist started from)
  ``head_delta_norm`` = ‖(Wᵢ, bᵢ) − (W₀, b₀)‖₂ with ``head_delta_ratio`` to the median over all N.

Flags (robust for N ≥ 3; with N < 3 no rule can tell which specialist is the odd one, so none is raised and the
report says so). Every threshold is an argument of `screen_specialists`:

- norm:            norm_ratio > ``norm_factor`` or < 1/``norm_factor`` (default 3);
- cosine:          mean_cosine < ``min_cosine`` (default 0.0) while others_agreement ≥ ``min_agreement`` (default
                   0.1): i points away from specialists that agree with each other. When the others do not agree
                   (near-orthogonal task vectors) there is no consensus to be an outlier from, and nothing is flagged.
                   A flipped-label fine-tune need not trip it (its head absorbs the sign; the backbone's task vector
                   can stay positively aligned): the head-direction rule is the one that catches it;
- spectrum:        top_direction_share / median over all N > ``spectrum_factor`` or < 1/``spectrum_factor`` (3);
- head direction:  head_cosine < ``min_cosine`` while head_agreement ≥ ``min_agreement`` (a flipped-label head
                   points the other way);
- head delta:      head_delta_ratio > ``norm_factor`` or < 1/``norm_factor`` (only with a base head).

The merge stage decides what a flag does (`stage.screen=warn|refuse|off`); this module only measures and reports.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from r2m_lab.mergers.task_vectors import (
    check_heads,
    check_keys,
    cosines_from_gram,
    family_names,
    gram,
    is_matrix_key,
    iter_task_vectors,
    matrix_blocks,
)

StateDict = Mapping[str, Tensor]

POWER_ITERATIONS = 12  # for σ₁ of each matrix block; see the module docstring
POWER_SEED = 0  # the fixed start vector: the same statistic on every run


@dataclass(frozen=True)
class Flag:
    """One reason to distrust one specialist: which statistic, its value, the threshold's side, in words."""

    family: str
    statistic: str  # "norm" | "cosine" | "spectrum" | "head_direction" | "head_delta"
    value: float
    reason: str


@dataclass
class SpecialistStats:
    """What the screen measured for one specialist (module docstring for each statistic)."""

    family: str
    norm: float
    norm_ratio: float
    mean_cosine: float
    others_agreement: float
    top_direction_share: float | None
    top_direction_ratio: float | None  # top_direction_share / its median over all N
    head_cosine: float | None = None
    head_agreement: float | None = None
    head_delta_norm: float | None = None
    head_delta_ratio: float | None = None


@dataclass
class ScreeningReport:
    """Per-specialist statistics, the flags they raised, the thresholds used and notes (e.g. N < 3)."""

    families: list[str]
    stats: dict[str, SpecialistStats]
    cosines: list[list[float]]  # (N, N) task-vector cosines, families in `families` order
    flags: list[Flag] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[str]:
        """The flagged families, sorted, each once."""
        return sorted({flag.family for flag in self.flags})

    def to_dict(self) -> dict:
        """JSON-serialisable form (for a merge card)."""
        return {
            "families": list(self.families),
            "stats": {name: vars(stat).copy() for name, stat in self.stats.items()},
            "cosines": self.cosines,
            "flags": [vars(flag).copy() for flag in self.flags],
            "thresholds": dict(self.thresholds),
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """A Markdown summary: one table row per specialist, then the flags (or that there are none)."""

        def cell(value: float | None, digits: int = 3) -> str:
            return "–" if value is None else f"{value:.{digits}g}"

        lines = [
            "| specialist | ‖τ‖ | ‖τ‖ / median | mean cos | others' cos | top-direction share "
            "| head cos | head Δ / median | flagged |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        flagged = set(self.flagged)
        for name in self.families:
            s = self.stats[name]
            lines.append(
                f"| {name} | {cell(s.norm, 4)} | {cell(s.norm_ratio)} | {cell(s.mean_cosine)} "
                f"| {cell(s.others_agreement)} | {cell(s.top_direction_share)} | {cell(s.head_cosine)} "
                f"| {cell(s.head_delta_ratio)} | {'**yes**' if name in flagged else 'no'} |"
            )
        lines.append("")
        if self.flags:
            lines += [
                f"- **{flag.family}** ({flag.statistic} = {flag.value:.3g}): {flag.reason}" for flag in self.flags
            ]
        else:
            lines.append("No specialist flagged.")
        lines += [f"- note: {note}" for note in self.notes]
        return "\n".join(lines)


def _top_singular_squared(blocks: Tensor) -> Tensor:
    """σ₁² of each matrix by power iteration: (..., m, n) float64 -> (...,) float64."""
    generator = torch.Generator().manual_seed(POWER_SEED)
    v = torch.randn(blocks.shape[-1], 1, generator=generator, dtype=blocks.dtype).to(blocks.device)
    v = v.expand(*blocks.shape[:-2], -1, -1)  # (..., n, 1)
    for _ in range(POWER_ITERATIONS):
        u = blocks @ v  # (..., m, 1)
        v = blocks.mT @ u
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-300)
    return (blocks @ v).square().sum((-2, -1))


def _median_ratio(values: Sequence[float]) -> list[float]:
    """Each value over the median of all values (inf for a positive value when the median is 0, 1 for 0/0)."""
    median = statistics.median(values)
    return [value / median if median > 0 else (math.inf if value > 0 else 1.0) for value in values]


def _median_pairwise(cosines: Tensor, members: list[int]) -> float:
    """Median cosine over the distinct pairs of `members` (nan with fewer than two)."""
    pairs = [float(cosines[a, b]) for i, a in enumerate(members) for b in members[i + 1 :]]
    return statistics.median(pairs) if pairs else math.nan


def head_direction(head: Mapping[str, Tensor]) -> Tensor:
    """The head's fake-minus-real weight row W[1] − W[0] (D,) float64 on the CPU: the feature direction it scores."""
    weight = head["weight"]
    if weight.ndim != 2 or weight.shape[0] != 2:
        raise ValueError(f"a real/fake head weight must have shape (2, D), got {tuple(weight.shape)}")
    return (weight[1].to(torch.float64) - weight[0].to(torch.float64)).cpu()


def _head_vector(head: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([head[key].to(torch.float64).reshape(-1).cpu() for key in sorted(head)])


def screen_specialists(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    heads: Mapping[str, Mapping[str, Tensor]] | None = None,
    *,
    base_head: Mapping[str, Tensor] | None = None,
    norm_factor: float = 3.0,
    min_cosine: float = 0.0,
    min_agreement: float = 0.1,
    spectrum_factor: float = 3.0,
) -> ScreeningReport:
    """Measure every specialist's task vector (and head) against the others and flag outliers (module docstring).

    theta0, specialists: state dicts with the same keys, shapes and dtypes (checked as the mergers check them; the
    specialists may be lazy mappings, each tensor is read once). heads: {family: {"weight": (2, D), "bias": (2,)}},
    optional; base_head: the head the specialists were initialised from, optional. Raises ValueError on mismatched
    keys/shapes/dtypes, non-finite values, heads for other families, or thresholds out of range.
    """
    if not norm_factor > 1 or not spectrum_factor > 1 or not math.isfinite(norm_factor * spectrum_factor):
        raise ValueError(
            f"norm_factor and spectrum_factor must be finite and > 1, got {norm_factor}, {spectrum_factor}"
        )
    if not -1 <= min_cosine <= 1 or not -1 <= min_agreement <= 1:
        raise ValueError(f"min_cosine and min_agreement must be in [-1, 1], got {min_cosine}, {min_agreement}")
    names = family_names(specialists)
    check_keys(theta0, specialists)
    if heads is not None:
        check_heads(heads, names)
    n = len(names)

    task_gram = torch.zeros(n, n, dtype=torch.float64)
    top_energy = torch.zeros(n, dtype=torch.float64)  # Σ_blocks σ₁²
    matrix_energy = torch.zeros(n, dtype=torch.float64)  # Σ_blocks ‖·‖²_F
    for key, _, taus in iter_task_vectors(theta0, specialists, names):
        if taus is None or not taus.any():
            continue
        task_gram += gram(taus)
        if is_matrix_key(key) and taus.ndim == 3:
            blocks = matrix_blocks(key, taus)  # (N, B, m, n)
            top_energy += _top_singular_squared(blocks).sum(1).cpu()
            matrix_energy += blocks.square().sum((1, 2, 3)).cpu()

    norms = task_gram.diagonal().clamp_min(0).sqrt().tolist()
    cosines = torch.tensor(cosines_from_gram(task_gram), dtype=torch.float64)
    norm_ratios = _median_ratio(norms)
    has_matrices = bool(matrix_energy.sum() > 0)
    shares = (top_energy / matrix_energy.clamp_min(1e-300)).tolist() if has_matrices else [None] * n
    share_ratios = _median_ratio(shares) if has_matrices else [None] * n

    stats: dict[str, SpecialistStats] = {}
    for i, name in enumerate(names):
        others = [j for j in range(n) if j != i]
        stats[name] = SpecialistStats(
            family=name,
            norm=norms[i],
            norm_ratio=norm_ratios[i],
            mean_cosine=float(cosines[i, others].mean()) if others else math.nan,
            others_agreement=_median_pairwise(cosines, others),
            top_direction_share=shares[i],
            top_direction_ratio=share_ratios[i],
        )

    if heads is not None:
        directions = torch.stack([head_direction(heads[name]) for name in names])  # (N, D)
        unit = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-300)
        head_cosines = unit @ unit.T
        for i, name in enumerate(names):
            others = [j for j in range(n) if j != i]
            if others:
                mean_other = directions[others].mean(0)
                denominator = float(directions[i].norm() * mean_other.norm())
                stats[name].head_cosine = float(directions[i] @ mean_other) / denominator if denominator > 0 else 0.0
                stats[name].head_agreement = _median_pairwise(head_cosines, others)
        if base_head is not None:
            base = _head_vector(base_head)
            deltas = []
            for name in names:
                vector = _head_vector(heads[name])
                if vector.shape != base.shape:
                    raise ValueError(f"head of {name!r} has {vector.numel()} values, the base head {base.numel()}")
                deltas.append(float((vector - base).norm()))
            for name, delta, ratio in zip(names, deltas, _median_ratio(deltas), strict=True):
                stats[name].head_delta_norm, stats[name].head_delta_ratio = delta, ratio

    report = ScreeningReport(
        families=names,
        stats=stats,
        cosines=cosines.tolist(),
        thresholds={
            "norm_factor": norm_factor,
            "min_cosine": min_cosine,
            "min_agreement": min_agreement,
            "spectrum_factor": spectrum_factor,
        },
    )
    if n < 3:
        report.notes.append(
            f"{n} specialist(s): outlier rules need at least 3 to tell which one is odd; statistics only, no flags"
        )
        return report
    if not has_matrices:
        report.notes.append("no matrix keys (attention/MLP weights): the spectrum statistic was not computed")
    report.flags = _flags(report, norm_factor, min_cosine, min_agreement, spectrum_factor)
    return report


def _flags(
    report: ScreeningReport, norm_factor: float, min_cosine: float, min_agreement: float, spectrum_factor: float
) -> list[Flag]:
    flags = []

    def outside(value: float | None, factor: float) -> bool:
        return value is not None and (value > factor or value < 1 / factor)

    for name in report.families:
        s = report.stats[name]
        if outside(s.norm_ratio, norm_factor):
            flags.append(
                Flag(
                    name,
                    "norm",
                    s.norm_ratio,
                    f"task-vector norm {s.norm:.4g} is {s.norm_ratio:.3g}× the median "
                    f"of all specialists (outside [1/{norm_factor:g}, {norm_factor:g}])",
                )
            )
        if s.mean_cosine < min_cosine and s.others_agreement >= min_agreement:
            flags.append(
                Flag(
                    name,
                    "cosine",
                    s.mean_cosine,
                    f"mean cosine {s.mean_cosine:.3g} to the other task vectors is "
                    f"below {min_cosine:g} while they agree with each other (median cosine {s.others_agreement:.3g})",
                )
            )
        if s.top_direction_share is not None:
            ratio = s.top_direction_ratio
            if outside(ratio, spectrum_factor):
                flags.append(
                    Flag(
                        name,
                        "spectrum",
                        s.top_direction_share,
                        f"top singular direction holds "
                        f"{s.top_direction_share:.3g} of the matrix energy, {ratio:.3g}× the median "
                        f"(outside [1/{spectrum_factor:g}, {spectrum_factor:g}])",
                    )
                )
        if (
            s.head_cosine is not None
            and s.head_cosine < min_cosine
            and s.head_agreement is not None
            and s.head_agreement >= min_agreement
        ):
            flags.append(
                Flag(
                    name,
                    "head_direction",
                    s.head_cosine,
                    f"head's fake−real direction has cosine "
                    f"{s.head_cosine:.3g} to the others' mean, which agree with each other (median "
                    f"{s.head_agreement:.3g}): it may be trained with flipped labels",
                )
            )
        if outside(s.head_delta_ratio, norm_factor):
            flags.append(
                Flag(
                    name,
                    "head_delta",
                    s.head_delta_ratio,
                    f"head moved {s.head_delta_norm:.4g} from the base head, {s.head_delta_ratio:.3g}× the median",
                )
            )
    return flags
