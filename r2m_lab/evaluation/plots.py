"""Figures for evaluation runs: ROC curves per model and annotated heatmaps (model × test-set AUC, task-vector cosines).

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through ``pyplot``: rendering is headless,
the global backend is left alone, and no figure stays registered after the function returns. Files are written
atomically (temp file with the same extension in the target folder, then ``os.replace``); the format follows the
path's extension (PNG normally).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics.functional.classification import binary_auroc

from r2m_lab.atomic import atomic_path
from r2m_lab.evaluation.metrics import as_scores_labels, roc_curve

log = logging.getLogger(__name__)

_DPI = 150


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render ``fig`` (a pyplot-free ``Figure``) to ``path`` atomically, then drop its artists; returns ``path``."""
    path = Path(path)
    FigureCanvasAgg(fig)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=_DPI, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        fig.clear()
    return path


def plot_roc(curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike[str], title: str = "ROC") -> Path:
    """One ROC curve per model (``name -> (scores, labels)``) with its AUC in the legend, plus the chance diagonal.

    A model whose labels hold a single class has no ROC curve: it is skipped with a logged warning.
    """
    fig = Figure(figsize=(5.0, 5.0))
    ax = fig.add_subplot()
    for name, (scores, labels) in curves.items():
        s, y = as_scores_labels(scores, labels)
        n_fake = int(y.sum())
        if n_fake in (0, y.numel()):
            log.warning("ROC of %r skipped: its labels hold a single class", name)
            continue
        fpr, tpr, _ = roc_curve(s, y)
        auc = float(binary_auroc(s, y))
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1.0, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (real called fake)", ylabel="true positive rate")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)


def plot_heatmap(
    row_names: Sequence[str],
    col_names: Sequence[str],
    values: Any,
    path: str | os.PathLike[str],
    title: str = "",
    fmt: str = ".2f",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """An annotated heatmap of a 2-D ``values`` array (rows × columns); NaN cells are blank and annotated ``n/a``.

    ``vmin`` / ``vmax`` fix the colour scale (e.g. 0.5-1 for AUC, -1-1 for cosines); by default it spans the data.
    """
    data = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    if data.shape != (len(row_names), len(col_names)):
        raise ValueError(f"values of shape {data.shape} do not match {len(row_names)} rows × {len(col_names)} columns")
    n_rows, n_cols = data.shape
    fig = Figure(figsize=(max(4.0, 0.9 * n_cols + 2.5), max(3.0, 0.5 * n_rows + 1.5)))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(data)
    image = ax.imshow(masked, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(n_cols), labels=list(col_names), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n_rows), labels=list(row_names))
    if title:
        ax.set_title(title)
    norm, cmap = image.norm, image.get_cmap()
    for i in range(n_rows):
        for j in range(n_cols):
            v = data[i, j]
            if not math.isfinite(v):
                ax.text(j, i, "n/a", ha="center", va="center", color="black", fontsize="small")
                continue
            r, g, b, _ = cmap(norm(v))
            colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"  # readable on the cell
            ax.text(j, i, format(v, fmt), ha="center", va="center", color=colour, fontsize="small")
    return save_figure(fig, path)


def plot_selection(
    labels: Sequence[str], values: Sequence[float], chosen: int, path: str | os.PathLike[str], title: str
) -> Path:
    """A hyper-parameter selection curve: validation AUC per grid point (in grid order), the chosen point marked."""
    fig = Figure(figsize=(max(4.0, 0.6 * len(labels) + 2.0), 3.5))
    ax = fig.add_subplot()
    xs = np.arange(len(labels))
    ax.plot(xs, values, marker="o", linewidth=1.5)
    ax.plot(
        [xs[chosen]],
        [values[chosen]],
        marker="*",
        markersize=14,
        color="tab:red",
        linestyle="none",
        label=f"chosen: {labels[chosen]}",
    )
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize="small")
    ax.set(ylabel="validation AUC (frame)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return save_figure(fig, path)
