"""Mergers: pure functions that combine specialists fine-tuned from one θ₀, without retraining.

Each module exposes `merge(theta0, specialists, heads, **hyper_parameters) -> MergeResult`; Hydra's merger configs
point at it (`_target_: r2m_lab.mergers.<name>.merge`, `_partial_: true`) and the merge stage calls it with the
state dicts. Every merger streams the (possibly lazy) specialists key by key, returns θ₀'s keys, shapes and dtypes,
and averages the heads. The formulas and decided defaults are in `shared/design/merging.md`.

- `average`          θ₀ + τ̄                                   weight averaging (model soups)
- `task_arithmetic`  θ₀ + λ Σᵢ τᵢ                              task arithmetic, λ = 0.3
- `r2m`              θ₀ + τ_core + η·τ_res                     R²M, Real-aware Residual Model Merging

`task_vectors` holds what they share: `MergeResult`, streaming and checks, key classes (matrix keys, norms and
biases, fused qkv), head averaging, low-rank SVD and task-vector diagnostics (norms, cosines).
"""

from r2m_lab.mergers.task_vectors import MergeResult

__all__ = ["MergeResult"]
