"""Interpolation curves: AUC per family along R²M's residual scale η and along the mean task vector's scale λ.

- η-path: θ(η) = θ₀ + τ_core + η·τ_res (`Components.backbone`), so η = 0 is the Real core alone and the knobs' η is
  the merge itself (bit for bit);
- λ-path: θ(λ) = θ₀ + λ·τ̄, so λ = 1 is weight averaging and λ = 0 is θ₀.

Both carry the averaged head (the one every merger returns). The caller's ``score`` maps a (backbone, head) pair
to AUC per family (and any pooled entry it likes), None where a family has one class; which split it scores is the
caller's to say, and the stage writes it next to the curves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from r2m_lab.mergers.r2m import Components
from r2m_lab.mergers.task_vectors import apply_delta, average_heads, check_keys, family_names, iter_task_vectors

StateDict = Mapping[str, Tensor]
Score = Callable[[StateDict, Mapping[str, Tensor]], Mapping[str, float | None]]


def check_grid(name: str, values: Sequence[float]) -> list[float]:
    """A non-empty list of finite numbers, as floats, in the order given; anything else is refused by name."""
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of numbers, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must hold finite numbers, got {value!r}")
        out.append(float(value))
    return out


def mean_task_vector(theta0: StateDict, specialists: Mapping[str, StateDict]) -> dict[str, Tensor]:
    """τ̄ per key whose τ is non-zero in some specialist, float64, θ₀'s shapes (read once, key by key)."""
    names = family_names(specialists)
    check_keys(theta0, specialists)
    return {
        key: taus.mean(0)
        for key, _, taus in iter_task_vectors(theta0, specialists, names)
        if taus is not None and taus.any()
    }


def scaled_backbone(theta0: StateDict, delta: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """θ₀ + scale·δ with θ₀'s keys and dtypes (keys without δ: θ₀); with δ = τ̄ and scale 1 this is weight
    averaging bit for bit (the same float64 sum and one rounding as `merge_keys`)."""
    return {
        key: apply_delta(theta0[key], scale * delta[key]) if key in delta else theta0[key].clone() for key in theta0
    }


def eta_curve(
    theta0: StateDict, components: Components, head: Mapping[str, Tensor], etas: Sequence[float], score: Score
) -> list[dict[str, Any]]:
    """``[{"eta": η, "auc": score(θ₀ + τ_core + η·τ_res, head)}]`` in grid order."""
    etas = check_grid("eta grid", etas)
    return [
        {"eta": eta, "auc": dict(score(components.backbone(theta0, eta), head))}
        for eta in tqdm(etas, desc="η-path", leave=False)
    ]


def lambda_curve(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    head: Mapping[str, Tensor],
    lams: Sequence[float],
    score: Score,
) -> list[dict[str, Any]]:
    """``[{"lambda": λ, "auc": score(θ₀ + λ·τ̄, head)}]`` in grid order."""
    lams = check_grid("lambda grid", lams)
    mean = mean_task_vector(theta0, specialists)  # one read of the specialists for the whole grid
    return [
        {"lambda": lam, "auc": dict(score(scaled_backbone(theta0, mean, lam), head))}
        for lam in tqdm(lams, desc="λ-path", leave=False)
    ]


def interpolation_curves(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    heads: Mapping[str, Mapping[str, Tensor]],
    components: Components,
    etas: Sequence[float],
    lams: Sequence[float],
    score: Score,
) -> dict[str, Any]:
    """Both paths with the averaged head; ``knob_eta`` is the η the R²M knobs resolve to (the merge on the η-path)."""
    head = average_heads(heads)
    return {
        "eta": eta_curve(theta0, components, head, etas, score),
        "lambda": lambda_curve(theta0, specialists, head, lams, score),
        "knob_eta": components.eta,
        "r2m_hyperparameters": components.diagnostics["hyperparameters"],
    }
