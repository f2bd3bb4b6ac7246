"""Mergers: combine specialists fine-tuned from one θ₀ in weight space, without retraining.

A merger is one YAML and one module. ``conf/merger/<name>.yaml`` holds its knobs' defaults with their comments,
``_target_`` (its class in ``r2m_lab/mergers/<name>.py``) and ``_select_`` (the validation grid the pipeline chooses
from, or null). The module holds one frozen dataclass, subclass of `Knobs`, that meets the `Merger` protocol: typed
fields without defaults (the knobs), ``check(n_tasks)`` (every refusal, before any checkpoint is read) and
``__call__(theta0, specialists, heads) -> MergeResult``. Every merger streams the (possibly lazy) specialists key by
key (`task_vectors.merge_keys` is the one loop), returns θ₀'s keys, shapes and dtypes, and averages the heads.
`merger_names` lists every merger from ``conf/merger/`` for the pipeline, the sweep, the benchmark and the tests;
`load_merger(name, **overrides)` builds one with its YAML's defaults. The formulas and decided defaults are in
`shared/design/merging.md`.

- `average`          θ₀ + τ̄                                   weight averaging (model soups)
- `task_arithmetic`  θ₀ + λ Σᵢ τᵢ                              task arithmetic
- `r2m`              θ₀ + τ_core + η·τ_res                     R²M, Real-aware Residual Model Merging
- `ties`             θ₀ + λ·disjoint_mean(elect(trim(τ)))     TIES-Merging (global per-task trim)
- `dare`             drop p, rescale 1/(1−p), then TA or TIES  DARE, seeded per (family, key)
- `cart`             θ₀ + τ̄ + λ Σᵢ SVD_ρ(τᵢ − τ̄)              CART, centred low-rank task vectors
- `tsv`              θ₀ + λ·U⊥ diag(σ) V⊥ᵀ                     TSV-M, orthogonalised task singular vectors
- `iso_c`            θ₀ + λ·σ̄ U Vᵀ(Σᵢ τᵢ), τ̄ elsewhere          Iso-C, isotropic spectrum of Σᵢ τᵢ (λ = the authors α)

The output ensemble and joint training are reference rows, not mergers: see `r2m_lab.evaluation` and
``stage.reference_rows`` of the pipeline. `task_vectors` holds what mergers share: `MergeResult`, streaming and
checks, key classes (matrix keys, norms and biases, fused qkv), head averaging, low-rank SVD, task-vector
diagnostics (norms, cosines), knob checks and stable seeds.
"""

from r2m_lab.mergers.configs import (
    build_merger,
    load_merger,
    load_merger_config,
    merger_hparams,
    merger_name,
    merger_names,
    merger_paths,
    selection_grid,
)
from r2m_lab.mergers.contract import Knobs, Merger
from r2m_lab.mergers.task_vectors import MergeResult

__all__ = [
    "Knobs",
    "MergeResult",
    "Merger",
    "build_merger",
    "load_merger",
    "load_merger_config",
    "merger_hparams",
    "merger_name",
    "merger_names",
    "merger_paths",
    "selection_grid",
]
