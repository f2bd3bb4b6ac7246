"""Task arithmetic: θ* = θ₀ + λ Σᵢ τᵢ.

Ilharco et al., "Editing models with task arithmetic", ICLR 2023. λ (conf/merger/task_arithmetic.yaml) is chosen
on the in-distribution validation split by the pipeline; λ = 1/N is weight averaging and λ = 0 returns θ₀.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from r2m_lab.mergers.contract import ScaledKnobs
from r2m_lab.mergers.task_vectors import MergeResult, merge_key_by_key


@dataclass(frozen=True)
class TaskArithmetic(ScaledKnobs):
    """θ₀ + λ Σᵢ τᵢ. lam: λ, any finite number."""

    def __call__(
        self,
        theta0: Mapping[str, Tensor],
        specialists: Mapping[str, Mapping[str, Tensor]],
        heads: Mapping[str, Mapping[str, Tensor]],
    ) -> MergeResult:
        """θ₀ + λ Σᵢ τᵢ on every key (one streaming pass), heads averaged."""
        lam = float(self.lam)
        return merge_key_by_key(
            theta0,
            specialists,
            heads,
            "task_arithmetic",
            lambda _key, taus: lam * taus.sum(0),
            {"lam": lam},
            elementwise=True,
        )
