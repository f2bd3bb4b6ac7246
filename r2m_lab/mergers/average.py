"""Weight averaging: θ* = θ₀ + τ̄ = (1/N) Σᵢ θᵢ.

"Model soups" (Wortsman et al., ICML 2022). The R²M paper (arXiv 2509.24367) starts from the observation that
plain averaging keeps the specialists' shared Real representation while attenuating their Fake-specific cues.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from r2m_lab.mergers.task_vectors import MergeResult, merge_key_by_key


def validate() -> None:
    """Weight averaging has no hyper-parameters: nothing to check (the merge stage calls every merger's validate)."""


def merge(
    theta0: Mapping[str, Tensor],
    specialists: Mapping[str, Mapping[str, Tensor]],
    heads: Mapping[str, Mapping[str, Tensor]],
) -> MergeResult:
    """θ₀ + mean τᵢ on every key (one streaming pass), heads averaged."""
    # mean = sum / N (not Σ τᵢ/N), so N identical specialists give that specialist exactly.
    return merge_key_by_key(theta0, specialists, heads, "average", lambda taus: taus.mean(0))
