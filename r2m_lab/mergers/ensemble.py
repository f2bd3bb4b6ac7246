"""Output ensemble: a reference row, not a merge. P*(fake | x) = reduce over i of Pᵢ(fake | x).

The classic upper reference for merging (e.g. Wortsman et al., "Model soups", ICML 2022, compare soups with output
ensembles): every specialist is run on every frame, so inference costs N× one model, and nothing is combined in
weight space. ``merger=ensemble`` makes ``stage=evaluate`` score every specialist and report the ensemble;
``stage=merge`` only records which specialists form it. The mean (default) averages probabilities; the median and
the max are knobs for robustness studies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REDUCTIONS = ("mean", "median", "max")


def validate(*, reduction: str = "mean") -> None:
    """Refuse an unknown reduction (called by the stages at config time)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def merge(probabilities: Sequence[np.ndarray], *, reduction: str = "mean") -> np.ndarray:
    """Combine N models' P(fake) for the same frames: N arrays of shape (F,) -> (F,) float64."""
    validate(reduction=reduction)
    if not len(probabilities):
        raise ValueError("an ensemble needs at least one member's scores")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities])  # (N, F)
    return getattr(np, reduction)(stacked, axis=0)
