"""The analysis figures, one PNG each, drawn on pyplot-free Agg figures and written atomically
(`r2m_lab.evaluation.plots.save_figure`). Missing values (a family with one class) are drawn as ``n/a`` cells or
left out of a curve with a legend note, never as NaN."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from r2m_lab.evaluation.plots import plot_heatmap, save_figure

PathLike = str | os.PathLike[str]


def _value(v: float | None) -> float:
    return math.nan if v is None else float(v)


def plot_similarity(similarity: Mapping[str, Any], metric: str, path: PathLike, title: str) -> Path:
    """Heatmap of ``metric`` (``cka`` | ``mean_cosine``): rows = (specialist, merged) pairs, columns = family/class.

    similarity: ``{family: {class: {"<a>|<b>": {metric: value}}}}``.
    """
    columns = [(family, cls) for family, by_class in similarity.items() for cls in ("real", "fake")]
    pairs = sorted({pair for by_class in similarity.values() for by_pair in by_class.values() for pair in by_pair})
    values = [
        [_value(similarity[family].get(cls, {}).get(pair, {}).get(metric)) for family, cls in columns] for pair in pairs
    ]
    rows = [pair.replace("|", " vs ") for pair in pairs]
    return plot_heatmap(rows, [f"{f}/{c}" for f, c in columns], values, path, title, fmt=".2f", vmin=0, vmax=1)


def plot_spectrum(gram: Mapping[str, Any], subspace: Mapping[str, Any], path: PathLike) -> Path:
    """Left: each eigenvalue's share of the task-vector Gram trace. Right: per family, the share of its task vector
    in R²M's Real subspace and along τ_core."""
    fig = Figure(figsize=(9.0, 3.5))
    left, right = fig.subplots(1, 2)
    share = gram["energy_share"]
    left.bar(range(1, len(share) + 1), share, color="tab:blue")
    left.set(xlabel="eigen-direction of the task-vector Gram", ylabel="share of Σλ", ylim=(0, 1))
    left.set_xticks(range(1, len(share) + 1))
    left.set_title("task-vector Gram spectrum")
    families = subspace["families"]
    xs = np.arange(len(families))
    right.bar(xs - 0.2, [subspace["subspace_fraction"][f] for f in families], 0.4, label="in the Real subspace")
    right.bar(xs + 0.2, [subspace["core_fraction"][f] for f in families], 0.4, label="along τ_core (cos²)")
    right.set_xticks(xs, families, rotation=30, ha="right")
    right.set(ylabel="share of ‖τᵢ‖²", ylim=(0, 1.05))
    right.set_title(f"Real core (rank {gram['r2m_core_rank']})")
    right.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_block_energy(blocks: Mapping[str, Any], path: PathLike) -> Path:
    """‖·‖ per layer group: each task vector, τ_core, τ_res (before η) and each merged model's θ* − θ₀."""
    groups = blocks["groups"]
    xs = np.arange(len(groups))
    fig = Figure(figsize=(max(6.0, 0.5 * len(groups) + 3.0), 4.0))
    ax = fig.add_subplot()
    for name, energy in blocks["task_vectors"].items():
        ax.plot(xs, np.sqrt([energy[g] for g in groups]), marker="o", linewidth=1, alpha=0.8, label=f"τ[{name}]")
    ax.plot(xs, np.sqrt([blocks["core"][g] for g in groups]), color="black", linewidth=2.5, label="τ_core")
    ax.plot(xs, np.sqrt([blocks["residual"][g] for g in groups]), color="black", linestyle="--", label="τ_res")
    for label, energy in blocks["merged_delta"].items():
        ax.plot(xs, np.sqrt([energy[g] for g in groups]), linestyle=":", linewidth=2, label=f"{label} − θ₀")
    ax.set_xticks(xs, groups, rotation=45, ha="right")
    ax.set(ylabel="‖·‖ in the group")
    if any(v > 0 for e in blocks["task_vectors"].values() for v in e.values()):
        ax.set_yscale("log")
    ax.set_title("where the weight changes sit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    return save_figure(fig, path)


def plot_residual_spectra(spectra: Mapping[str, Any], order: Sequence[str], path: PathLike) -> Path:
    """Left: the fraction of each residual matrix's energy the truncation keeps, per family. Right: the leading
    singular values before (solid) and after (dashed) truncation of the first, middle and last matrix, first family."""
    matrices = spectra["matrices"]
    fig = Figure(figsize=(11.0, 4.0))
    left, right = fig.subplots(1, 2)
    if not order:
        left.text(0.5, 0.5, "no matrix keys", ha="center", va="center")
        right.set_axis_off()
        return save_figure(fig, path)
    families = list(matrices[order[0]]["families"])
    xs = np.arange(len(order))
    for family in families:
        kept = [_value(matrices[label]["families"][family]["energy_kept"]) for label in order]
        left.plot(xs, kept, marker=".", label=family)
    left.set_xticks(xs, order, rotation=90, fontsize=5)
    left.set(ylabel="‖r̂ᵢ‖² / ‖rᵢ‖²", ylim=(0, 1.05))
    left.set_title("residual energy kept by the rank truncation")
    left.legend(fontsize="x-small")
    picks = sorted({0, len(order) // 2, len(order) - 1})
    family = families[0]
    for pick, colour in zip(picks, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        entry = matrices[order[pick]]["families"][family]
        kept_rank = matrices[order[pick]]["kept_rank"]
        label = f"{order[pick]}" + (f" (q={kept_rank})" if kept_rank else "")
        right.semilogy(
            range(1, len(entry["before"]) + 1), np.maximum(entry["before"], 1e-30), color=colour, label=label
        )
        after = [v for v in entry["after"] if v > 1e-12 * max(entry["after"][0], 1e-300)]  # the kept rank only
        right.semilogy(range(1, len(after) + 1), after, "--", marker="x", color=colour)
    right.set(xlabel="singular value index", ylabel="σ", ylim=(1e-8 * max(1e-30, _top(matrices, order, family)), None))
    right.set_title(f"residual spectra of {family}: before (—) / after (--)")
    right.legend(fontsize="x-small")
    fig.tight_layout()
    return save_figure(fig, path)


def _top(matrices: Mapping[str, Any], order: Sequence[str], family: str) -> float:
    return max((max(matrices[label]["families"][family]["before"], default=0.0) for label in order), default=1.0)


def plot_directions(directions: Mapping[str, Any], path: PathLike, title: str) -> Path:
    """Heatmap of the angle (degrees) between each specialist's fake−real feature direction and the merged model's
    on the same frames, per family (columns)."""
    pairs = list(directions["pairs"])
    families = sorted({family for by_family in directions["pairs"].values() for family in by_family})
    angles = [[_value(directions["pairs"][pair].get(f)) for f in families] for pair in pairs]
    rows = [pair.replace("|", " vs ") for pair in pairs]
    return plot_heatmap(rows, families, angles, path, title, fmt=".1f", vmin=0, vmax=90)


def plot_head_alignment(heads: Mapping[str, Any], path: PathLike, title: str) -> Path:
    """Heatmap of the cosines between head directions W[1] − W[0] (specialists' and merged models')."""
    labels = heads["labels"]
    cosines = [[_value(c) for c in row] for row in heads["cosines"]]
    return plot_heatmap(labels, labels, cosines, path, title, fmt=".2f", vmin=-1, vmax=1)


def plot_interpolation(curves: Mapping[str, Any], path: PathLike, split: str) -> Path:
    """AUC per family (and pooled, bold) along η (left, the knobs' η marked) and along λ (right, λ = 1 marked:
    weight averaging). A family with one class has no curve and says so in the legend."""
    fig = Figure(figsize=(11.0, 4.0))
    left, right = fig.subplots(1, 2, sharey=True)
    for ax, points, key, mark, xlabel in (
        (left, curves["eta"], "eta", curves["knob_eta"], "η  (θ₀ + τ_core + η·τ_res)"),
        (right, curves["lambda"], "lambda", 1.0, "λ  (θ₀ + λ·τ̄)"),
    ):
        xs = [point[key] for point in points]
        names = list(points[0]["auc"]) if points else []
        for name in names:
            ys = [_value(point["auc"].get(name)) for point in points]
            if all(math.isnan(y) for y in ys):
                ax.plot([], [], linestyle="none", label=f"{name}: one class (n/a)")
                continue
            bold = name == "pooled"
            ax.plot(xs, ys, marker="o", linewidth=2.5 if bold else 1.2, color="black" if bold else None, label=name)
        ax.axvline(mark, color="tab:red", linestyle=":", linewidth=1)
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
    left.set(ylabel=f"frame AUC ({split} split)")
    left.set_title(f"R²M residual scale (knobs' η = {curves['knob_eta']:.3g}, dotted)")
    right.set_title("mean task vector scale (λ = 1: averaging, dotted)")
    right.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_interference(report: Mapping[str, Any], path: PathLike, title: str) -> Path:
    """Heatmap of the AUC change per family (rows) when one layer group (columns) takes the merged weights."""
    groups, families = report["groups"], list(report["families"])
    values = [[_value(report["families"][f]["delta"][g]) for g in groups] for f in families]
    finite = [abs(v) for row in values for v in row if math.isfinite(v)]
    span = max(finite, default=0.0) or 0.01
    return plot_heatmap(families, groups, values, path, title, fmt="+.3f", vmin=-span, vmax=span)
