"""Bootstrap statistics of AUC: the paired difference between two rows of a table with a percentile interval.

What is resampled, and why
--------------------------
* **Test videos**, with replacement, within each test set. Frames of one video are strongly correlated (same face,
  same manipulation), so the video is the independent unit: resampling frames would make intervals far too narrow.
  A replicate is a vector of multinomial counts over the set's videos; frame-level AUC then weights every frame by
  its video's count (all frames of a drawn video, as often as it was drawn), video-level AUC weights the videos.
* **Paired**: both rows of a comparison are scored on the *same* replicate. Two detectors err on many of the same
  hard videos, so their AUCs are positively correlated and the variance of the difference is much smaller than the
  sum of their variances; unpaired intervals would call real differences ties.
* **Seeds** (two-level bootstrap), when a table pools several training seeds: a replicate first draws the seeds
  with replacement, then the videos; the statistic is the mean over the drawn seeds of the per-seed difference on
  the same video replicate. The seed level carries the training noise (data order, augmentation): a difference
  that one lucky seed produces is not a result. Test sets are fixed, so the videos are the same for every seed
  (checked, and refused otherwise), and one video draw serves all seeds of a replicate.
* A protocol (or group) mean difference is the mean over its sets of the per-set differences *on the same
  replicate*, so its interval accounts for the sets being scored by the same models.

The interval is the percentile interval of the B replicates (``confidence`` 0.95 → 2.5 % and 97.5 % quantiles).
Replicates whose resample holds a single class (AUC undefined) are dropped and counted (``n_undefined``).

Speed: the AUC of all B replicates is computed at once. Per model and set, the (fake video × real video) matrix of
correctly ordered frame pairs (ties half) is counted once (:class:`SortedScores`); a replicate's Mann-Whitney
numerator is then ``w⁺ M w⁻`` for its video counts, a matrix product over B, independent of the number of frames.
:func:`weighted_auc` (per-score weights) sorts the scores once and sums per tie run instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Bound on the (replicates × frames) weight matrix of one chunk: 2**24 float64 = 128 MiB.
_CHUNK_ELEMENTS = 1 << 24


def plain_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC as P(score of a fake > score of a real) + ½ P(tie), by ranks (NaN with a single class)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    return float(weighted_auc(s, y, np.ones((1, s.size)))[0])


class SortedScores:
    """The scores of one model on one test set, reduced once to what the AUC of any video resample needs.

    ``unit`` maps each score to its resampling unit (its video): weights are given per unit, shape (B, n_units).
    Under unit weights w the Mann-Whitney numerator is ``Σ_{u,v} w_u w_v M[u, v]`` with ``M[u, v]`` = the number of
    (fake frame of u, real frame of v) pairs ordered correctly, ties counted half; ``M`` is (units with fakes ×
    units with reals), computed once per model and set (one ``searchsorted`` per real unit), so a replicate costs a
    vector-matrix product instead of a pass over every frame.
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray, unit: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        positive = np.asarray(labels).astype(bool)
        unit = np.asarray(unit)
        n_units = int(unit.max()) + 1 if unit.size else 0
        self.n_units = n_units
        self.pos_units = np.unique(unit[positive])  # (U⁺,) units holding fake frames
        self.neg_units = np.unique(unit[~positive])  # (U⁻,) units holding real frames
        self.pos_count = np.bincount(unit[positive], minlength=n_units).astype(np.float64)  # (n_units,)
        self.neg_count = np.bincount(unit[~positive], minlength=n_units).astype(np.float64)
        pos_scores, pos_unit = scores[positive], unit[positive]
        row = np.searchsorted(self.pos_units, pos_unit)  # (F⁺,) row of M of each fake frame
        pairs = np.zeros((self.pos_units.size, self.neg_units.size), dtype=np.float64)  # (U⁺, U⁻)
        for j, v in enumerate(self.neg_units):
            real = np.sort(scores[~positive & (unit == v)])  # (F_v,) real frames of unit v
            below = np.searchsorted(real, pos_scores, side="left")  # real frames of v scored below each fake
            tied = np.searchsorted(real, pos_scores, side="right") - below
            pairs[:, j] = np.bincount(row, weights=below + 0.5 * tied, minlength=self.pos_units.size)
        self.pairs = pairs

    def auc(self, unit_weights: np.ndarray) -> np.ndarray:
        """AUC under each row of ``unit_weights`` (B, n_units) → (B,); NaN where a replicate has a single class."""
        weights = np.asarray(unit_weights, dtype=np.float64)
        w_pos, w_neg = weights[:, self.pos_units], weights[:, self.neg_units]  # (B, U⁺), (B, U⁻)
        num = ((w_pos @ self.pairs) * w_neg).sum(axis=1)
        den = (weights @ self.pos_count) * (weights @ self.neg_count)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _weighted_auc_sorted(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC under per-score weights (B, n): a weighted Mann-Whitney over the scores sorted once, ties half."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    positive = np.asarray(labels)[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # (G,) tie-run starts
    weights = np.asarray(weights, dtype=np.float64)
    n = scores.size
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    out = np.empty(weights.shape[0], dtype=np.float64)
    for lo in range(0, weights.shape[0], chunk):
        w = weights[lo : lo + chunk][:, order]  # (b, n) weight of each sorted score
        w_pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)  # (b, G) per tie run
        w_neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
        below = np.cumsum(w_neg, axis=1) - w_neg  # negative weight strictly below each tie run
        num = (w_pos * (below + 0.5 * w_neg)).sum(axis=1)
        den = w_pos.sum(axis=1) * w_neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + chunk] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of ``scores`` under each row of per-score ``weights`` (B, n) → (B,) (see the module docstring)."""
    return _weighted_auc_sorted(scores, labels, weights)


@dataclass(frozen=True)
class Draws:
    """The resamples of one table, shared by every row so that every comparison is paired.

    ``seeds`` (B, S): how often each of the S seeds is drawn in a replicate (all ones with one seed);
    ``videos[set]`` (B, V): how often each video of the set is drawn.
    """

    seeds: np.ndarray
    videos: dict[str, np.ndarray]

    @property
    def n_replicates(self) -> int:
        return int(self.seeds.shape[0])


def draw(n_seeds: int, n_videos: dict[str, int], replicates: int, seed: int) -> Draws:
    """Multinomial seed and video counts from ``np.random.default_rng(seed)``: seeds first, then each set in
    ``n_videos`` order (the same settings and table give the same draws)."""
    if replicates < 1:
        raise ValueError(f"stage.bootstrap must be at least 1, got {replicates}")
    rng = np.random.default_rng(seed)
    if n_seeds == 1:
        seeds = np.ones((replicates, 1), dtype=np.int64)
    else:
        seeds = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=replicates)
    videos = {name: rng.multinomial(n, np.full(n, 1.0 / n), size=replicates) for name, n in n_videos.items()}
    return Draws(seeds=seeds, videos=videos)


def pool_seeds(per_seed: Sequence[np.ndarray], seed_counts: np.ndarray) -> np.ndarray:
    """Replicates of the mean over drawn seeds: ``per_seed[s]`` (B,) is seed s's statistic on each replicate's
    videos; ``seed_counts`` (B, S) the seed draw → (B,) ``Σ_s m_bs x_bs / S``."""
    stacked = np.stack(per_seed, axis=1)  # (B, S)
    return (stacked * seed_counts).sum(axis=1) / seed_counts.shape[1]


@dataclass(frozen=True)
class Interval:
    """A bootstrapped difference: point estimate (mean over seeds of the observed difference), interval bounds."""

    mean: float
    lo: float
    hi: float
    n_undefined: int = 0

    @property
    def excludes_zero(self) -> bool:
        return bool(self.lo > 0 or self.hi < 0)


def interval(point: float, replicates: np.ndarray, confidence: float) -> Interval:
    """Percentile interval of ``replicates`` (NaN replicates dropped and counted)."""
    if not 0 < confidence < 1:
        raise ValueError(f"stage.confidence must lie in (0, 1), got {confidence}")
    finite = replicates[np.isfinite(replicates)]
    undefined = int(replicates.size - finite.size)
    if finite.size == 0:
        return Interval(point, float("nan"), float("nan"), undefined)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return Interval(float(point), float(lo), float(hi), undefined)
