"""Frame-level AUC that says "one class" instead of returning NaN: the analysis plots ``n/a`` and writes a note."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from r2m_lab.evaluation.metrics import frame_metrics


def one_class_note(name: str, labels: np.ndarray, split: str) -> str | None:
    """A sentence when ``labels`` hold one class only (no AUC, no real/fake contrast exists there), else None."""
    labels = np.asarray(labels)
    n_fake = int(labels.sum())
    n_real = len(labels) - n_fake
    if n_fake and n_real:
        return None
    return (
        f"family {name}: its {split} split holds {n_real} real and {n_fake} fake frames (one class): its AUC, its "
        "fake-vs-real direction and its similarity on the missing class are not computed (n/a)"
    )


def auc_or_none(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Frame AUC of P(fake) scores, None when the labels hold one class (instead of NaN)."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return None
    return float(frame_metrics(scores, labels)["auc"])


def aucs(scores: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """AUC per named set (``auc_or_none``), in ``scores``' order."""
    return {name: auc_or_none(values, labels[name]) for name, values in scores.items()}
