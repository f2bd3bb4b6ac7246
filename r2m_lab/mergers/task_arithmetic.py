"""Task arithmetic: θ* = θ₀ + λ Σᵢ τᵢ.

Ilharco et al., "Editing models with task arithmetic", ICLR 2023. λ (default 0.3) is chosen on the in-distribution
validation split; λ = 1/N is weight averaging and λ = 0 returns θ₀.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from r2m_lab.mergers.task_vectors import MergeResult, is_finite_number, merge_key_by_key


def validate(*, lam: float = 0.3) -> None:
    """Refuse a λ that is not a finite number (called by the merge stage at config time, and by merge)."""
    if not is_finite_number(lam):
        raise ValueError(f"lam must be a finite number, got {lam!r}")


def merge(
    theta0: Mapping[str, Tensor],
    specialists: Mapping[str, Mapping[str, Tensor]],
    heads: Mapping[str, Mapping[str, Tensor]],
    *,
    lam: float = 0.3,
) -> MergeResult:
    """θ₀ + λ Σᵢ τᵢ on every key (one streaming pass), heads averaged."""
    validate(lam=lam)
    lam = float(lam)
    return merge_key_by_key(theta0, specialists, heads, "task_arithmetic", lambda taus: lam * taus.sum(0), {"lam": lam})
