"""Weight averaging: θ* = θ₀ + τ̄ = (1/N) Σᵢ θᵢ.

"Model soups" (Wortsman et al., ICML 2022). The R²M paper (arXiv 2509.24367) starts from the observation that
plain averaging keeps the specialists' shared Real representation while attenuating their Fake-specific cues.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from r2m_lab.mergers.contract import Knobs
from r2m_lab.mergers.task_vectors import MergeResult, merge_key_by_key


@dataclass(frozen=True)
class Average(Knobs):
    """Weight averaging has no knobs (conf/merger/average.yaml): nothing to check."""

    def __call__(
        self,
        theta0: Mapping[str, Tensor],
        specialists: Mapping[str, Mapping[str, Tensor]],
        heads: Mapping[str, Mapping[str, Tensor]],
    ) -> MergeResult:
        """θ₀ + mean τᵢ on every key (one streaming pass), heads averaged."""
        # mean = sum / N (not Σ τᵢ/N), so N identical specialists give that specialist exactly; elementwise: merged in
        # cache-sized chunks of each key (`merge_keys`).
        return merge_key_by_key(
            theta0, specialists, heads, "average", lambda _key, taus: taus.mean(0), elementwise=True
        )
