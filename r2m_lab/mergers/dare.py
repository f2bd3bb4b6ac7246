"""DARE: drop and rescale each task vector, then combine by task arithmetic or TIES.

Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
ICML 2024 (arXiv 2311.03099). With task vectors τᵢ = θᵢ − θ₀:

    mᵢ ~ Bernoulli(1 − p) per entry,   τ̃ᵢ = mᵢ ⊙ τᵢ / (1 − p)      (E[τ̃ᵢ] = τᵢ)
    combine="task_arithmetic":  θ* = θ₀ + λ Σᵢ τ̃ᵢ                    (λ default 0.3, task arithmetic's)
    combine="ties":             θ* = TIES(τ̃₁..τ̃_N)                  (r2m_lab.mergers.ties; its knobs; λ default 1.0)

p = 0.5 by default, p ∈ [0, 1) (p = 0 is plain task arithmetic / TIES). Heads are averaged.

Reproducibility: the mask of (family, key) is drawn from its own CPU generator seeded with
SHA-256(seed, "dare", family, key), so it does not depend on key order, on which other keys exist, on the device the
merge runs on, or on Python's salted hash(). A different `seed` gives different masks. Keys that no specialist
changed are never masked (τ = 0 stays 0) and stay θ₀ bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from r2m_lab.mergers import ties
from r2m_lab.mergers.task_vectors import (
    MergeResult,
    PhaseTimer,
    average_heads,
    check_choice,
    check_heads,
    check_keys,
    family_names,
    is_finite_number,
    merge_diagnostics,
    merge_keys,
    stable_seed,
)

COMBINES = ("task_arithmetic", "ties")
DEFAULT_LAM = {"task_arithmetic": 0.3, "ties": 1.0}

StateDict = Mapping[str, Tensor]


def validate(
    *,
    p: Any = 0.5,
    lam: Any = None,
    combine: Any = "task_arithmetic",
    seed: Any = 0,
    density: Any = 0.2,
    trim_scope: Any = "global",
    merge_fn: Any = "disjoint_mean",
) -> None:
    """Refuse out-of-range knobs before any work (the merge stage calls this at config time, and merge does).

    TIES' knobs (density, trim_scope, merge_fn) are checked whatever ``combine`` is, so a typo never hides.
    """
    if not is_finite_number(p) or not 0 <= p < 1:
        raise ValueError(f"p (the drop probability) must be in [0, 1), got {p!r}")
    if lam is not None and not is_finite_number(lam):
        raise ValueError(f"lam must be a finite number or null (the combiner's default), got {lam!r}")
    check_choice("combine", combine, COMBINES)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    ties.validate(density=density, lam=1.0, trim_scope=trim_scope, merge_fn=merge_fn)


def keep_mask(seed: int, family: str, key: str, shape: torch.Size | Sequence[int], p: float) -> Tensor:
    """The entries of τ_family[key] that DARE keeps: a bool tensor of ``shape``, each True with probability 1 − p.

    Drawn on the CPU from a generator seeded by (seed, family, key) alone (see the module docstring).
    """
    generator = torch.Generator().manual_seed(stable_seed(seed, "dare", family, key))
    return torch.rand(tuple(shape), generator=generator) >= p


class DropAndRescale:
    """τ̃ᵢ = mᵢ ⊙ τᵢ / (1 − p) for one key's stack; remembers the kept count per (key, task) for the diagnostics.

    Called once per key per pass (TIES needs three passes); the masks are the same every time, so a key's count is
    overwritten, never double-counted.
    """

    def __init__(self, names: Sequence[str], p: float, seed: int) -> None:
        self.names, self.p, self.seed = list(names), p, seed
        self.kept: dict[str, list[int]] = {}
        self.entries: dict[str, int] = {}

    def __call__(self, key: str, taus: Tensor) -> Tensor:
        masks = torch.stack([keep_mask(self.seed, name, key, taus.shape[1:], self.p) for name in self.names])
        self.kept[key] = masks.reshape(len(self.names), -1).sum(1).tolist()
        self.entries[key] = taus[0].numel()
        # (N, *shape): survivors rescaled by 1/(1 − p) so each entry keeps its expectation
        return torch.where(masks.to(taus.device), taus / (1 - self.p), 0.0)

    def kept_fraction(self) -> dict[str, float]:
        """Kept entries over the entries of the keys some specialist changed, per family."""
        total = sum(self.entries.values())
        kept = [sum(counts[i] for counts in self.kept.values()) for i in range(len(self.names))]
        return {name: kept[i] / total if total else 1.0 for i, name in enumerate(self.names)}


def merge(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    heads: Mapping[str, Mapping[str, Tensor]],
    *,
    p: float = 0.5,
    lam: float | None = None,
    combine: str = "task_arithmetic",
    seed: int = 0,
    density: float = 0.2,
    trim_scope: str = "global",
    merge_fn: str = "disjoint_mean",
) -> MergeResult:
    """DARE (module docstring): drop with probability p, rescale by 1/(1 − p), then task arithmetic or TIES.

    lam: λ of the combiner; None takes its default (0.3 for task arithmetic, 1.0 for TIES). density, trim_scope,
    merge_fn: TIES' knobs, used only with ``combine="ties"``.
    """
    validate(p=p, lam=lam, combine=combine, seed=seed, density=density, trim_scope=trim_scope, merge_fn=merge_fn)
    lam_used = float(DEFAULT_LAM[combine] if lam is None else lam)
    names = family_names(specialists)
    dropper = DropAndRescale(names, float(p), seed)
    hyperparameters: dict[str, Any] = {"p": float(p), "lam": lam_used, "combine": combine, "seed": seed}
    if combine == "ties":
        result, _ = ties.ties_merge(
            theta0,
            specialists,
            heads,
            density=density,
            lam=lam_used,
            trim_scope=trim_scope,
            merge_fn=merge_fn,
            transform=dropper,
            merger="dare",
            hyperparameters=hyperparameters,
        )
        result.diagnostics["kept_fraction_dare"] = dropper.kept_fraction()
        return result

    check_keys(theta0, specialists)
    check_heads(heads, names)
    timer = PhaseTimer()
    streamed = merge_keys(theta0, specialists, names, lambda key, taus: lam_used * dropper(key, taus).sum(0))
    timer.tick("merge")
    diagnostics = merge_diagnostics(
        "dare", names, hyperparameters, streamed.task_gram, len(streamed.backbone), streamed.n_zero_keys, timer.timings
    )
    diagnostics["kept_fraction_dare"] = dropper.kept_fraction()
    return MergeResult(backbone=streamed.backbone, head=average_heads(heads), diagnostics=diagnostics)
