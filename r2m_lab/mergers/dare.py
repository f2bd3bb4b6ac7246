"""DARE: drop and rescale each task vector, then combine by task arithmetic or TIES.

Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
ICML 2024 (arXiv 2311.03099). With task vectors τᵢ = θᵢ − θ₀:

    mᵢ ~ Bernoulli(1 − p) per entry,   τ̃ᵢ = mᵢ ⊙ τᵢ / (1 − p)      (E[τ̃ᵢ] = τᵢ)
    combine="task_arithmetic":  θ* = θ₀ + λ Σᵢ τ̃ᵢ
    combine="ties":             θ* = TIES(τ̃₁..τ̃_N)                  (r2m_lab.mergers.ties, with its knobs)

p ∈ [0, 1) (p = 0 is plain task arithmetic / TIES; conf/merger/dare.yaml has 0.5). ``lam: null`` takes the
combiner's own default, read from its YAML (conf/merger/task_arithmetic.yaml: 0.3, conf/merger/ties.yaml: 1.0), so
that default is written once. Heads are averaged.

Reproducibility: the mask of (family, key) is drawn from its own CPU generator seeded with
SHA-256(seed, "dare", family, key), so it does not depend on key order, on which other keys exist, on the device the
merge runs on, or on Python's salted hash(). A different `seed` gives different masks. Keys that no specialist
changed are never masked (τ = 0 stays 0) and stay θ₀ bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from r2m_lab.mergers import ties
from r2m_lab.mergers.configs import load_merger_config
from r2m_lab.mergers.contract import Knobs
from r2m_lab.mergers.task_vectors import (
    MergeResult,
    check_choice,
    family_names,
    is_finite_number,
    merge_key_by_key,
    stable_seed,
)

COMBINES = ("task_arithmetic", "ties")  # each is also a merger: lam=null takes its YAML's lam

StateDict = Mapping[str, Tensor]


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


@dataclass(frozen=True)
class DARE(Knobs):
    """DARE (module docstring): drop with probability p, rescale by 1/(1 − p), then task arithmetic or TIES.

    lam: λ of the combiner, or None for the combiner's default. seed: the masks' seed. density, trim_scope,
    merge_fn: TIES' knobs, used only with ``combine="ties"`` but always checked, so a typo never hides.
    """

    p: float
    lam: float | None
    combine: str
    seed: int
    density: float
    trim_scope: str
    merge_fn: str

    def check(self, n_tasks: int | None = None) -> None:
        """Refuse out-of-range knobs before any work."""
        if not is_finite_number(self.p) or not 0 <= self.p < 1:
            raise ValueError(f"p (the drop probability) must be in [0, 1), got {self.p!r}")
        if self.lam is not None and not is_finite_number(self.lam):
            raise ValueError(f"lam must be a finite number or null (the combiner's default), got {self.lam!r}")
        check_choice("combine", self.combine, COMBINES)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        # TIES' own check of its knobs (λ is DARE's, checked above)
        ties.TIES(density=self.density, lam=1.0, trim_scope=self.trim_scope, merge_fn=self.merge_fn)

    def combiner_lam(self) -> float:
        """λ used: ``lam``, or the combiner's default from its YAML when ``lam`` is None."""
        return float(self.lam if self.lam is not None else load_merger_config(self.combine)["lam"])

    def __call__(
        self, theta0: StateDict, specialists: Mapping[str, StateDict], heads: Mapping[str, Mapping[str, Tensor]]
    ) -> MergeResult:
        """Drop, rescale, then combine (module docstring); heads averaged."""
        lam_used = self.combiner_lam()
        names = family_names(specialists)
        dropper = DropAndRescale(names, float(self.p), self.seed)
        hyperparameters: dict[str, Any] = {
            "p": float(self.p),
            "lam": lam_used,
            "combine": self.combine,
            "seed": self.seed,
        }
        if self.combine == "ties":
            result, _ = ties.ties_merge(
                theta0,
                specialists,
                heads,
                density=self.density,
                lam=lam_used,
                trim_scope=self.trim_scope,
                merge_fn=self.merge_fn,
                transform=dropper,
                merger="dare",
                hyperparameters=hyperparameters,
            )
        else:
            result = merge_key_by_key(
                theta0,
                specialists,
                heads,
                "dare",
                lambda key, taus: lam_used * dropper(key, taus).sum(0),
                hyperparameters,
            )
        result.diagnostics["kept_fraction_dare"] = dropper.kept_fraction()
        return result
