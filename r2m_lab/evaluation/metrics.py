"""Frame- and video-level detection metrics and decision thresholds.

Conventions: fake is the positive class (label 1), a score is P(fake) in [0, 1], and a sample is called fake when
``score >= threshold`` (the same rule as the ROC curve, so a threshold read off a ROC point reproduces that point).
Scores and labels may be torch tensors, numpy arrays or sequences; everything is computed on CPU in float64.

Ranking metrics (AUC, AP, the ROC curve) come from ``torchmetrics.functional``. Two things it does not provide in the
form the protocol needs are derived here from its ROC curve:

- EER is *interpolated*: the ROC is piecewise linear between its points, and the EER is where that line crosses
  FPR = FNR (= 1 - TPR). ``torchmetrics``' ``binary_eer`` instead averages FPR and FNR at the nearest point.
- TPR at a target FPR is the best TPR among the ROC points with FPR <= target, i.e. an operating point a real
  threshold achieves (no interpolation, hence conservative on small test sets).

With only one class present the ranking metrics are undefined: they are returned as NaN and a warning is logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_confusion_matrix,
    binary_roc,
)

log = logging.getLogger(__name__)

ThresholdMode = Literal["fixed", "eer", "fpr"]
Reduce = Literal["mean", "median", "max"]

FIXED_THRESHOLD = 0.5
# Float tolerance when comparing rates against a target FPR (rates are ratios of counts).
_RATE_TOL = 1e-12


def as_scores_labels(scores: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert to 1-D CPU tensors: scores float64 in [0, 1], labels int64 in {0, 1}.

    A trailing singleton dimension, e.g. (N, 1) model outputs, is accepted. Empty input raises ``ValueError``.
    """
    s = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores)
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    s = s.detach().cpu().to(torch.float64)
    y = y.detach().cpu()
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {tuple(s.shape)} and {tuple(y.shape)}")
    if s.numel() != y.numel():
        raise ValueError(f"scores ({s.numel()}) and labels ({y.numel()}) differ in length")
    if s.numel() == 0:
        raise ValueError("no scores to evaluate (empty input)")
    if not torch.isfinite(s).all() or s.min() < 0 or s.max() > 1:
        raise ValueError("scores must be finite probabilities P(fake) in [0, 1] (apply a sigmoid/softmax to logits)")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got values {torch.unique(y).tolist()}")
    return s, y.to(torch.int64)


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve ``(fpr, tpr, thresholds)`` as float64 arrays, thresholds decreasing, starting at (0, 0).

    Point ``k`` is what the rule ``score >= thresholds[k]`` gives. The first point calls nothing fake; its
    threshold is 1.0, or the next float above 1.0 when a score equals 1.0. Both classes must be present.
    """
    s, y = as_scores_labels(scores, labels)
    n_fake = int(y.sum())
    n_real = y.numel() - n_fake
    if n_fake == 0 or n_real == 0:
        raise ValueError(f"a ROC curve needs both classes, got {n_real} real and {n_fake} fake samples")
    fpr_t, tpr_t, thr_t = binary_roc(s, y)
    # torchmetrics returns float32 rates; snap them back to exact count ratios so that hand-checkable values such
    # as 1/3 stay exact and comparisons against a target FPR are not off by float32 rounding.
    fpr = np.rint(fpr_t.double().numpy() * n_real) / n_real
    tpr = np.rint(tpr_t.double().numpy() * n_fake) / n_fake
    thr = thr_t.double().numpy().copy()
    # torchmetrics prepends threshold 1.0 for the (0, 0) point; with a score of exactly 1.0 that threshold would
    # call that sample fake, so move it just above the top score.
    thr[0] = max(1.0, float(np.nextafter(float(s.max()), np.inf)))
    return fpr, tpr, thr


def _eer_point(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) where the piecewise-linear ROC crosses FPR = FNR; the threshold is interpolated alike."""
    diff = (1.0 - tpr) - fpr  # FNR - FPR: +1 at the first point, -1 at the last, non-increasing in between
    k = int(np.argmax(diff <= 0))  # first point at or past the crossing (k >= 1 since diff[0] = 1)
    if diff[k] == 0:
        return float(fpr[k]), float(thr[k])
    alpha = diff[k - 1] / (diff[k - 1] - diff[k])
    eer = fpr[k - 1] + alpha * (fpr[k] - fpr[k - 1])
    threshold = thr[k - 1] + alpha * (thr[k] - thr[k - 1])
    return float(eer), float(threshold)


def _tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Best TPR over ROC points with FPR <= target (the (0, 0) point always qualifies)."""
    return float(tpr[fpr <= target + _RATE_TOL].max())


def fit_threshold(scores: Any, labels: Any, mode: ThresholdMode = "eer", target_fpr: float = 0.05) -> float:
    """Fit the decision threshold on a **validation** split; store it with the checkpoint and reuse it on test sets.

    Fitting on a test set and reporting that set's accuracy is optimistic; this function does not know which split it
    gets, so the caller must pass validation scores.

    Modes:
        ``"fixed"``: 0.5, whatever the scores (the uncalibrated default).
        ``"eer"``: the threshold at the EER point, linearly interpolated between the two ROC points around it.
        ``"fpr"``: the lowest ROC threshold whose FPR on these scores is still <= ``target_fpr``, i.e. the operating
            point with the highest TPR under that false-alarm budget (the most conservative threshold achieving it).

    ``"eer"`` and ``"fpr"`` need both classes and raise ``ValueError`` otherwise. The threshold may exceed 1.0
    slightly when a score equals 1.0 and the budget allows no positives at all.
    """
    s, y = as_scores_labels(scores, labels)
    if mode == "fixed":
        return FIXED_THRESHOLD
    if mode not in ("eer", "fpr"):
        raise ValueError(f"unknown threshold mode {mode!r}; expected 'fixed', 'eer' or 'fpr'")
    fpr, tpr, thr = roc_curve(s, y)
    if mode == "eer":
        return _eer_point(fpr, tpr, thr)[1]
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    k = int(np.flatnonzero(fpr <= target_fpr + _RATE_TOL)[-1])  # fpr is non-decreasing: last qualifying point
    return float(thr[k])


def frame_metrics(scores: Any, labels: Any, threshold: float = 0.5) -> dict[str, float]:
    """Detection metrics of one set of scores (frames, or videos after :func:`video_scores`).

    Returns ``auc``, ``ap``, ``eer`` (interpolated), ``acc`` and ``balanced_acc`` at ``threshold`` (fake iff
    ``score >= threshold``), ``tpr_at_fpr_1`` / ``tpr_at_fpr_5`` (FPR 1 % / 5 %), and the counts ``n``, ``n_fake``,
    ``n_real`` (ints). With one class only, ``auc``, ``ap``, ``eer`` and the TPR@FPR values are NaN (a warning is
    logged) and ``balanced_acc`` is the recall of the class present (= ``acc``).
    """
    s, y = as_scores_labels(scores, labels)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    n = y.numel()
    n_fake = int(y.sum())
    n_real = n - n_fake

    preds = (s >= threshold).to(torch.int64)  # int predictions: torchmetrics applies no threshold of its own
    (tn, fp), (fn, tp) = binary_confusion_matrix(preds, y).tolist()
    recalls = [tp / n_fake] if n_fake else []
    recalls += [tn / n_real] if n_real else []
    out: dict[str, float] = {
        "auc": math.nan,
        "ap": math.nan,
        "eer": math.nan,
        "acc": (tp + tn) / n,
        "balanced_acc": sum(recalls) / len(recalls),
        "tpr_at_fpr_1": math.nan,
        "tpr_at_fpr_5": math.nan,
        "n": n,
        "n_fake": n_fake,
        "n_real": n_real,
    }
    if n_fake == 0 or n_real == 0:
        log.warning(
            "only one class present (%d real, %d fake): auc, ap, eer and tpr@fpr are undefined and set to NaN",
            n_real,
            n_fake,
        )
        return out
    fpr, tpr, thr = roc_curve(s, y)
    out["auc"] = float(binary_auroc(s, y))
    out["ap"] = float(binary_average_precision(s, y))
    out["eer"] = _eer_point(fpr, tpr, thr)[0]
    out["tpr_at_fpr_1"] = _tpr_at_fpr(fpr, tpr, 0.01)
    out["tpr_at_fpr_5"] = _tpr_at_fpr(fpr, tpr, 0.05)
    return out


def video_scores(
    scores: Any, labels: Any, video_ids: Sequence[str], reduce: Reduce = "mean"
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Aggregate frame scores per video: ``(scores float64, labels int64, ids)``, videos in order of first appearance.

    ``video_ids`` must be unique across datasets (e.g. ``dataset/label/video``): frames sharing an id are pooled.
    ``reduce`` is ``"mean"``, ``"median"`` (average of the two middle values for an even count) or ``"max"``. A
    video whose frames carry different labels raises ``ValueError`` naming it.
    """
    s, y = as_scores_labels(scores, labels)
    ids = [str(v) for v in video_ids]
    if len(ids) != s.numel():
        raise ValueError(f"video_ids ({len(ids)}) and scores ({s.numel()}) differ in length")
    if reduce not in ("mean", "median", "max"):
        raise ValueError(f"unknown reduce {reduce!r}; expected 'mean', 'median' or 'max'")

    index: dict[str, int] = {}
    group = torch.tensor([index.setdefault(v, len(index)) for v in ids], dtype=torch.int64)  # (N,) video index
    unique_ids = list(index)
    n_videos = len(unique_ids)

    lab_min = torch.full((n_videos,), 1, dtype=torch.int64).scatter_reduce(0, group, y, "amin")
    lab_max = torch.full((n_videos,), 0, dtype=torch.int64).scatter_reduce(0, group, y, "amax")
    mixed = torch.nonzero(lab_min != lab_max).flatten().tolist()
    if mixed:
        names = ", ".join(repr(unique_ids[i]) for i in mixed[:5])
        raise ValueError(f"{len(mixed)} video(s) have frames with both labels: {names}")

    if reduce == "mean":
        counts = torch.bincount(group, minlength=n_videos).to(torch.float64)
        agg = torch.zeros(n_videos, dtype=torch.float64).index_add_(0, group, s) / counts
    elif reduce == "max":
        agg = torch.zeros(n_videos, dtype=torch.float64).scatter_reduce(0, group, s, "amax", include_self=False)
    else:
        # No scatter-median in torch: sort frames by video, split into per-video chunks.
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=n_videos).tolist()
        agg = torch.stack([torch.quantile(chunk, 0.5) for chunk in torch.split(s[order], counts)])
    return agg, lab_min, unique_ids


def video_metrics(
    scores: Any, labels: Any, video_ids: Sequence[str], threshold: float = 0.5, reduce: Reduce = "mean"
) -> dict[str, float]:
    """:func:`frame_metrics` on the per-video scores of :func:`video_scores` (counts are then videos)."""
    v_scores, v_labels, _ = video_scores(scores, labels, video_ids, reduce)
    return frame_metrics(v_scores, v_labels, threshold)


def evaluate_scores(
    scores: Any, labels: Any, video_ids: Sequence[str], threshold: float, reduce: Reduce = "mean"
) -> dict[str, dict[str, float]]:
    """``{"frame": frame_metrics(...), "video": video_metrics(...)}`` at one stored threshold (used for both)."""
    return {
        "frame": frame_metrics(scores, labels, threshold),
        "video": video_metrics(scores, labels, video_ids, threshold, reduce),
    }
