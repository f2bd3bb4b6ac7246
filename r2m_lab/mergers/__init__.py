"""Mergers: pure functions that combine specialists fine-tuned from one θ₀, without retraining.

Each module exposes `merge(theta0, specialists, heads, **hyper_parameters) -> MergeResult`; Hydra's merger configs
point at it (`_target_: r2m_lab.mergers.<name>.merge`, `_partial_: true`) and the merge stage calls it with the
state dicts. Every merger streams the (possibly lazy) specialists key by key, returns θ₀'s keys, shapes and dtypes,
and averages the heads. The formulas and decided defaults are in `shared/design/merging.md`.

- `average`          θ₀ + τ̄                                   weight averaging (model soups)
- `task_arithmetic`  θ₀ + λ Σᵢ τᵢ                              task arithmetic, λ = 0.3
- `r2m`              θ₀ + τ_core + η·τ_res                     R²M, Real-aware Residual Model Merging
- `ties`             θ₀ + λ·disjoint_mean(elect(trim(τ)))     TIES-Merging, density 0.2 (global per-task trim), λ = 1
- `dare`             drop p, rescale 1/(1−p), then TA or TIES  DARE, p = 0.5, seeded per (family, key)
- `cart`             θ₀ + τ̄ + λ Σᵢ SVD_ρ(τᵢ − τ̄)              CART, centred low-rank task vectors, ρ = 0.1, λ = 1
- `tsv`              θ₀ + λ·U⊥ diag(σ) V⊥ᵀ                     TSV-M, orthogonalised task singular vectors, λ = 1
- `iso_c`            θ₀ + λ·σ̄ U Vᵀ(Σᵢ τᵢ)/N                    Iso-C, isotropic spectrum of the summed task matrix

`task_vectors` holds what they share: `MergeResult`, streaming and checks, key classes (matrix keys, norms and
biases, fused qkv), head averaging, low-rank SVD, task-vector diagnostics (norms, cosines), knob checks, stable
seeds and the per-key streaming pass that hands the combiner the key's name (`merge_keys`).
"""

from r2m_lab.mergers.task_vectors import MergeResult

__all__ = ["MergeResult"]
