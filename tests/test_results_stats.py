"""The bootstrap AUC of r2m_lab.results.stats against brute-force pair counting on explicitly resampled data."""

from __future__ import annotations

import numpy as np
import pytest

from r2m_lab.results.stats import SortedScores, draw, interval, plain_auc, pool_seeds, weighted_auc


def brute_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(fake > real) + ½ P(tie) over every (fake, real) pair, by explicit comparison."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def test_uniform_weights_give_the_plain_auc_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=40).astype(float) / 5  # many ties
    labels = rng.integers(0, 2, size=40)
    expected = brute_auc(scores, labels)
    assert plain_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert weighted_auc(scores, labels, np.ones((3, 40))) == pytest.approx([expected] * 3, abs=1e-12)


def test_single_class_is_nan():
    assert np.isnan(plain_auc(np.array([0.1, 0.2]), np.array([1, 1])))


@pytest.mark.parametrize("level", ["frame", "video"])
def test_replicate_auc_equals_auc_of_the_explicitly_resampled_data(level):
    rng = np.random.default_rng(1)
    n_videos, frames = 10, 3
    video = np.repeat(np.arange(n_videos), frames)  # (30,) video of each frame
    video_labels = np.array([0] * 5 + [1] * 5)
    frame_scores = np.round(rng.random(video.size), 1)  # ties across videos
    if level == "frame":
        scores, labels, unit = frame_scores, video_labels[video], video
    else:
        scores, labels, unit = np.bincount(video, frame_scores) / frames, video_labels, np.arange(n_videos)
    draws = draw(1, {"set": n_videos}, replicates=25, seed=3)
    counts = draws.videos["set"]  # (25, 10) how often each video is drawn
    fast = SortedScores(scores, labels, unit).auc(counts)
    for b in range(counts.shape[0]):
        # the resample written out: every frame (or video) of a drawn video, as many times as it was drawn
        repeat = counts[b][unit]
        explicit = brute_auc(np.repeat(scores, repeat), np.repeat(labels, repeat))
        assert fast[b] == pytest.approx(explicit, abs=1e-12)


def test_two_level_pooling_is_the_mean_over_drawn_seeds():
    draws = draw(3, {"set": 4}, replicates=50, seed=0)
    assert (draws.seeds.sum(axis=1) == 3).all() and (draws.videos["set"].sum(axis=1) == 4).all()
    per_seed = [np.full(50, v) for v in (0.1, 0.2, 0.6)]
    pooled = pool_seeds(per_seed, draws.seeds)
    expected = (draws.seeds * np.array([0.1, 0.2, 0.6])).sum(axis=1) / 3
    np.testing.assert_allclose(pooled, expected)
    assert len(set(np.round(pooled, 9))) > 1  # the seed level varies the statistic


def test_draws_are_reproducible_and_depend_on_the_seed():
    a, b, c = (draw(2, {"s": 8}, 20, seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a.videos["s"], b.videos["s"])
    assert not np.array_equal(a.videos["s"], c.videos["s"])


def test_interval_of_identical_models_is_zero_and_of_a_strictly_better_one_excludes_zero():
    zero = interval(0.0, np.zeros(100), 0.95)
    assert (zero.lo, zero.hi, zero.excludes_zero) == (0.0, 0.0, False)
    better = interval(0.1, np.linspace(0.01, 0.2, 100), 0.95)
    assert better.excludes_zero and better.lo > 0
    with pytest.raises(ValueError, match="confidence"):
        interval(0.0, np.zeros(3), 1.5)
