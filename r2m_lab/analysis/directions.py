"""Real/fake directions: does the merged model separate real from fake along the specialists' direction, and do
the heads agree?

- the separation direction of a model on a family is the difference of its class-mean pooled features,
  d = μ_fake − μ_real (D,); the angle between a specialist's d and the merged model's d on the same frames says
  whether merging kept the direction the specialist learned (0°) or turned it (90°: unrelated);
- the head direction is W[1] − W[0] (`r2m_lab.screening.head_direction`): the feature direction a 2-logit head
  scores as fake. The angle between a model's d and its own head's direction says whether the head looks where the
  features separate; the cosines between the specialists' and the merged (averaged) head's directions say whether
  one averaged head can serve every specialist (the paper's shared-Real argument).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from r2m_lab.screening import head_direction


def cosine(a: Tensor | None, b: Tensor | None) -> float | None:
    """cos(a, b) in float64; None when either is missing or zero."""
    if a is None or b is None:
        return None
    a, b = a.to(torch.float64).reshape(-1).cpu(), b.to(torch.float64).reshape(-1).cpu()
    if a.shape != b.shape:
        raise ValueError(f"cannot compare directions of {a.numel()} and {b.numel()} dimensions")
    denominator = float(a.norm() * b.norm())
    if not denominator > 0:
        return None
    return max(-1.0, min(1.0, float(a @ b) / denominator))


def angle_degrees(a: Tensor | None, b: Tensor | None) -> float | None:
    """The angle between two directions in degrees (0 = same, 90 = orthogonal, 180 = opposite); None as `cosine`."""
    c = cosine(a, b)
    return None if c is None else math.degrees(math.acos(c))


def separation(means: Mapping[str, Mapping[str, Tensor]], model: str) -> Tensor | None:
    """d = μ_fake − μ_real of one model from class means ``{class: {model: (D,)}}``; None when a class is missing."""
    if "real" not in means or "fake" not in means:
        return None
    return means["fake"][model] - means["real"][model]


def direction_report(
    means_by_family: Mapping[str, Mapping[str, Mapping[str, Tensor]]],
    pairs: Sequence[tuple[str, str]],
    heads: Mapping[str, Mapping[str, Tensor]],
) -> dict[str, Any]:
    """Angles per family (module docstring).

    means_by_family: ``{family: {class: {model: (D,) mean feature}}}`` (`features.FeatureStats.means`); pairs:
    (specialist, merged) model names; heads: ``{model: {"weight": (2, D), "bias": (2,)}}`` for every model named.
    Returns ``{"pairs": {"<a>|<b>": {family: angle(d_a, d_b)}}, "feature_vs_head": {model: {family: angle(d, head
    direction)}}, "separation_norm": {model: {family: ‖d‖}}}``; None where a family has one class.
    """
    models = sorted({name for pair in pairs for name in pair})
    missing = [model for model in models if model not in heads]
    if missing:
        raise ValueError(f"no head for {missing}")
    head_dirs = {model: head_direction(heads[model]) for model in models}
    out: dict[str, Any] = {"pairs": {}, "feature_vs_head": {}, "separation_norm": {}}
    for family, means in means_by_family.items():
        directions = {model: separation(means, model) for model in models}
        for a, b in pairs:
            out["pairs"].setdefault(f"{a}|{b}", {})[family] = angle_degrees(directions[a], directions[b])
        for model in models:
            d = directions[model]
            out["feature_vs_head"].setdefault(model, {})[family] = angle_degrees(d, head_dirs[model])
            out["separation_norm"].setdefault(model, {})[family] = None if d is None else float(d.norm())
    return out


def head_alignment(heads: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Any]:
    """Cosines between the head directions W[1] − W[0] of every pair of ``heads`` (``labels`` order), and each
    head's direction norm."""
    labels = list(heads)
    directions = [head_direction(heads[label]) for label in labels]
    return {
        "labels": labels,
        "cosines": [[cosine(a, b) for b in directions] for a in directions],
        "norms": {label: float(d.norm()) for label, d in zip(labels, directions, strict=True)},
    }
