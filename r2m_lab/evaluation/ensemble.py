"""Output ensemble: a reference row, not a merge. P*(fake | x) = reduce over i of Pᵢ(fake | x).

The classic upper reference for merging (e.g. Wortsman et al., "Model soups", ICML 2022, compare soups with output
ensembles): every specialist is run on every frame, so inference costs N× one model, and nothing is combined in
weight space. ``stage=evaluate stage.model=ensemble`` scores every specialist of the benchmark and reports the
ensemble beside them; ``stage.ensemble_reduction`` picks the reduction. The mean (default) averages probabilities;
the median and the max are knobs for robustness studies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REDUCTIONS = ("mean", "median", "max")


def check_reduction(reduction: str) -> None:
    """Refuse an unknown reduction before any model is scored."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"ensemble reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def combine(probabilities: Sequence[np.ndarray], reduction: str = "mean") -> np.ndarray:
    """Combine N models' P(fake) for the same frames: N arrays of shape (F,) -> (F,) float64."""
    check_reduction(reduction)
    if not len(probabilities):
        raise ValueError("an ensemble needs at least one member's scores")
    shapes = sorted({np.shape(p) for p in probabilities})
    if len(shapes) != 1 or len(shapes[0]) != 1:
        raise ValueError(f"ensemble members must score the same frames, one 1-D array each; got shapes {shapes}")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities])  # (N, F)
    return getattr(np, reduction)(stacked, axis=0)
