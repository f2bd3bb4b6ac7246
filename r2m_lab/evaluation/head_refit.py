"""A linear real/fake head refit on a frozen backbone's pooled features of the validation split (stage=heads).

The refit is logistic regression (scikit-learn ``LogisticRegression``, L2, lbfgs) on *standardised* features
(``StandardScaler``, fitted on the same frames), its inverse regularisation ``C`` chosen by cross-validation on
those frames only: ``StratifiedGroupKFold`` grouped by video, so the frames of one video (and the copies of one
real frame that several validation sets share, which carry the same video id) never sit in both folds; the score is
the mean held-out-fold frame AUC (the lab's selection metric), ties going to the smallest ``C`` (the strongest
regularisation). The chosen pipeline is refit on every frame and folded into the detector's 2-logit head exactly:
the detector's P(fake) is ``softmax(W f + b)[1] = sigmoid((W₁ - W₀) f + b₁ - b₀)`` and the regression's is
``sigmoid(w · (f - μ) / σ + c)``, so the head is ``W = [0, w / σ]``, ``b = [0, c - Σ w μ / σ]`` (real logit 0).

Nothing here sees a test frame: the caller hands the validation ``FrameSet`` and only it is featurised.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from r2m_lab.data.loaders import FrameDataset, build_transform, eval_loader
from r2m_lab.data.sources import FrameSet

log = logging.getLogger(__name__)

MAX_ITER = 1000  # lbfgs iterations per fit; the final fit's convergence is recorded in the facts
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 4, 9))


def check_two_classes(frames: FrameSet, what: str) -> None:
    """Refuse frames holding one class only: neither a regression nor an AUC exists on them."""
    if frames.n_fake == 0 or frames.n_real == 0:
        raise ValueError(
            f"{what} ({frames.name}) has {frames.n_real} real and {frames.n_fake} fake frames: a head cannot be refit "
            "(nor C cross-validated) on one class; its validation sets must hold both real and fake videos"
        )


@torch.inference_mode()
def pooled_features(
    backbone: nn.Module,
    frames: FrameSet,
    input_cfg: Mapping[str, Any],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """(F, D) float32 pooled features (what the head sees: ``backbone(x)``) of every frame of ``frames``, in order.

    Each distinct frame (by ``FrameSet.keys``) goes through the backbone once, batch by batch; only the (U, D)
    features are kept, then mapped back to the F frames.
    """
    _, first, inverse = np.unique(frames.keys, return_index=True, return_inverse=True)
    unique = frames.subset(first, f"{frames.name}/distinct")
    loader = eval_loader(FrameDataset(unique, build_transform(input_cfg)), int(batch_size))
    backbone.eval().to(device)
    out: np.ndarray | None = None
    for x, _, idx in loader:
        feats = backbone(x.to(device, non_blocking=True)).float()  # (B, D)
        if feats.ndim != 2:
            raise ValueError(f"the backbone returns features of shape {tuple(feats.shape)}, not pooled (B, D)")
        if out is None:
            out = np.empty((len(unique), feats.shape[1]), dtype=np.float32)
        out[idx.numpy()] = feats.cpu().numpy()
    if out is None:
        raise ValueError(f"{frames.name} holds no frames to featurise")
    return out[inverse.reshape(-1)]


def make_estimator(c: float, max_iter: int = MAX_ITER) -> Any:
    """The refit's estimator at one ``C``: standardisation then L2 logistic regression (lbfgs)."""
    from sklearn.linear_model import LogisticRegression  # scikit-learn takes ~1 s to import: only stage=heads needs it
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=float(c), max_iter=int(max_iter)))


def cv_splits(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds grouped by video: (train, held-out) frame indices, each side holding both classes.

    ``folds`` is lowered (logged, and the number used recorded by the caller) to the videos of the rarer class, as
    a fold needs a video of each class; fewer than two videos of a class are refused.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    videos = {int(c): len(np.unique(groups[labels == c])) for c in (0, 1)}
    k = min(int(folds), *videos.values())
    if k < 2:
        raise ValueError(
            f"cross-validating C needs at least two videos of each class in the validation split; it has "
            f"{videos[0]} real and {videos[1]} fake video(s)"
        )
    if k < folds:
        log.warning("head refit: %d folds asked, %d used (real videos %d, fake %d)", folds, k, videos[0], videos[1])
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(seed))
    splits = list(splitter.split(np.zeros(len(labels)), labels, groups))
    for i, (train, held) in enumerate(splits):
        for side, index in (("training", train), ("held-out", held)):
            if len(np.unique(labels[index])) < 2:
                raise ValueError(
                    f"fold {i} of {k}: its {side} frames hold one class only (videos: {videos}); lower "
                    "stage.refit.folds"
                )
    return splits


def logistic_head(estimator: Any) -> dict[str, torch.Tensor]:
    """The detector head (``weight`` (2, D), ``bias`` (2,), float32) equal to a fitted :func:`make_estimator`.

    softmax over [0, z] is sigmoid(z), so the fake logit carries the regression's decision function (the scaler
    folded in) and the real logit is 0. Folded in float64, then stored as float32 like every head.
    """
    scaler, regression = estimator[0], estimator[-1]
    if list(regression.classes_) != [0, 1]:
        raise ValueError(f"the regression was fitted on classes {list(regression.classes_)}, not [0 real, 1 fake]")
    coef = regression.coef_[0].astype(np.float64) / scaler.scale_  # (D,)
    intercept = float(regression.intercept_[0]) - float(coef @ scaler.mean_)
    weight = np.zeros((2, coef.shape[0]), dtype=np.float64)
    weight[1] = coef
    bias = np.array([0.0, intercept], dtype=np.float64)
    return {"weight": torch.from_numpy(weight).float(), "bias": torch.from_numpy(bias).float()}


def fit_logistic_head(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    cs: Sequence[float] = DEFAULT_CS,
    folds: int = 5,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """Choose C by grouped cross-validation, refit on every frame; return (head, fitted estimator, facts).

    features: (F, D); labels: (F,) 0 real / 1 fake; groups: (F,) video ids. The facts say what was done: the grid
    and its mean held-out-fold AUC per C, the C chosen, the folds used, the frame/video counts, the in-sample AUC of
    the final fit on these frames (``fit_auc``: a training figure, not a result) and whether it converged.
    """
    from sklearn.metrics import roc_auc_score

    cs = sorted(float(c) for c in cs)
    if not cs or any(not np.isfinite(c) or c <= 0 for c in cs):
        raise ValueError(f"stage.refit.Cs must be a non-empty list of positive numbers, got {cs}")
    features = np.asarray(features)
    labels = np.asarray(labels).astype(np.int64)
    if features.ndim != 2 or len(features) != len(labels) or len(groups) != len(labels):
        raise ValueError(f"features {features.shape}, labels ({len(labels)},) and groups ({len(groups)},) disagree")
    x = features.astype(np.float64)
    splits = cv_splits(labels, np.asarray(groups), folds, seed)
    curve = []
    for c in cs:
        aucs = []
        for train, held in splits:
            fold_fit = make_estimator(c).fit(x[train], labels[train])
            aucs.append(float(roc_auc_score(labels[held], fold_fit.decision_function(x[held]))))
        curve.append({"C": c, "cv_auc": float(np.mean(aucs)), "fold_aucs": aucs})
    best = max(range(len(cs)), key=lambda i: (curve[i]["cv_auc"], -i))  # ties: the smallest C
    estimator = make_estimator(cs[best]).fit(x, labels)
    n_iter = int(np.max(estimator[-1].n_iter_))
    converged = n_iter < MAX_ITER
    if not converged:
        log.warning("head refit at C=%g did not converge in %d lbfgs iterations", cs[best], MAX_ITER)
    if best in (0, len(cs) - 1) and len(cs) > 1:
        log.warning("head refit: C=%g sits at the edge of its grid %s; widen stage.refit.Cs", cs[best], cs)
    facts = {
        "estimator": "StandardScaler + LogisticRegression(L2, lbfgs), C by StratifiedGroupKFold over videos",
        "standardized": True,
        "C": cs[best],
        "at_grid_edge": best in (0, len(cs) - 1) and len(cs) > 1,
        "cv_auc": curve[best]["cv_auc"],
        "cv_curve": curve,
        "folds": len(splits),
        "frames": len(labels),
        "distinct_frames": None,  # filled in by refit_head, which knows the frame keys
        "videos": len(np.unique(groups)),
        "real_frames": int((labels == 0).sum()),
        "fake_frames": int((labels == 1).sum()),
        "feature_dim": int(features.shape[1]),
        "fit_auc": float(roc_auc_score(labels, estimator.decision_function(x))),
        "converged": converged,
        "iterations": n_iter,
    }
    return logistic_head(estimator), estimator, facts


def refit_head(
    backbone: nn.Module,
    frames: FrameSet,
    input_cfg: Mapping[str, Any],
    batch_size: int,
    device: torch.device | str = "cpu",
    cs: Sequence[float] = DEFAULT_CS,
    folds: int = 5,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Featurise ``frames`` (the validation split) with the frozen ``backbone`` and refit the head on them.

    Returns (head state {weight (2, D), bias (2,)}, facts of :func:`fit_logistic_head`).
    """
    check_two_classes(frames, "the refit's frames")
    features = pooled_features(backbone, frames, input_cfg, batch_size, device)  # (F, D)
    head, _, facts = fit_logistic_head(features, frames.labels, frames.video_ids, cs, folds, seed)
    facts["distinct_frames"] = len(np.unique(frames.keys))
    return head, facts
