"""Analysis: why a merge works or fails, measured on specialists and any merged model of one θ₀.

- `spectra`       the task-vector Gram spectrum, each task vector's energy in R²M's Real subspace, the energy per
                  layer group (τᵢ, τ_core, τ_res, θ* − θ₀) and the per-layer residual spectra before/after truncation
- `similarity`    `PairedMoments`: streamed linear CKA and mean cosine of two models' pooled features
- `features`      one pass over frames through several backbones: moments per class and pair, class means
- `directions`    angles between fake−real feature directions, and head-direction alignment
- `curves`        AUC per family along θ₀ + τ_core + η·τ_res and along θ₀ + λ·τ̄
- `interference`  AUC change per family when one layer group takes the merged weights
- `layers`        layer groups of a timm ViT (embed, block<i>, post, head) and swapping one group
- `lineage`       refusing checkpoints of another θ₀ (by ``base_hash``)
- `auc`           AUC that says "one class" instead of NaN
- `figures`       the PNGs (Agg, atomic)

The R²M decomposition itself is `r2m_lab.mergers.r2m.components` (the merge's own code). ``stage=analyze``
(`r2m_lab.stages.analyze`) runs all of it on a run's checkpoints.
"""

from r2m_lab.analysis.similarity import PairedMoments

__all__ = ["PairedMoments"]
