"""Weight-space facts behind R²M: the task-vector Gram spectrum, the Real-subspace energy of each task vector,
where in the network the energy sits, and the per-layer residual spectra before and after rank truncation.

Everything is read from `r2m_lab.mergers.r2m.components` (one R²M decomposition, the merge's own code) and one
streaming pass over the task vectors; nothing here re-derives the core or the residuals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from r2m_lab.analysis.layers import groups_of, layer_group
from r2m_lab.mergers.r2m import Components
from r2m_lab.mergers.task_vectors import is_fused_qkv, iter_task_vectors

StateDict = Mapping[str, Tensor]

QKV = ("q", "k", "v")


def gram_spectrum(components: Components) -> dict[str, Any]:
    """The plain task-vector Gram G = [τᵢ·τⱼ] (all keys), its eigenvalues and each one's share of the trace, next to
    R²M's own (γ-weighted, centred if configured) Gram spectrum and the rank k it keeps."""
    diagnostics = components.diagnostics
    names = components.names
    norms = torch.tensor([diagnostics["task_vector_norms"][name] for name in names], dtype=torch.float64)
    cosines = torch.tensor(diagnostics["task_vector_cosines"], dtype=torch.float64)
    gram = cosines * norms[:, None] * norms[None, :]  # (N, N): G from the merge's own norms and cosines
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    total = float(eigenvalues.sum())
    r2m_spectrum = torch.tensor(diagnostics["spectrum"], dtype=torch.float64).clamp_min(0)
    return {
        "families": list(names),
        "gram": gram.tolist(),
        "cosines": cosines.tolist(),
        "eigenvalues": eigenvalues.tolist(),
        "energy_share": (eigenvalues / total).tolist() if total > 0 else [0.0] * len(names),
        "r2m_gram_eigenvalues": r2m_spectrum.tolist(),
        "r2m_core_rank": diagnostics["core_rank"],
    }


def real_subspace_energy(components: Components) -> dict[str, Any]:
    """Per family: the share of τᵢ's energy in the Real subspace (``subspace_fraction``, from R²M's Gram), the share
    along τ_core itself (``core_fraction`` = cos²(τᵢ, τ_core)), ‖τᵢ‖, and the residual norms before and after
    truncation; plus ‖τ_core‖, ‖τ_res‖ and η."""
    d = components.diagnostics
    return {
        "families": list(components.names),
        "subspace_fraction": d["subspace_fraction"],
        "core_fraction": d["core_fraction"],
        "core_weights": d["core_weights"],
        "task_vector_norms": d["task_vector_norms"],
        "residual_norms_before": d["residual_norms_before"],
        "residual_norms_after": d["residual_norms_after"],
        "core_norm": d["core_norm"],
        "residual_norm": d["residual_norm"],
        "eta": d["eta"],
    }


def block_energy(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    components: Components,
    merged: Mapping[str, StateDict] | None = None,
) -> dict[str, Any]:
    """Squared norms per layer group (`layers.layer_group`): of each τᵢ, of τ_core, of τ_res (before η) and of
    each merged model's θ* − θ₀. Streams the task vectors key by key (the specialists may be lazy)."""
    names = components.names
    groups = groups_of(theta0)
    task = {name: dict.fromkeys(groups, 0.0) for name in names}
    core, residual = dict.fromkeys(groups, 0.0), dict.fromkeys(groups, 0.0)
    deltas = {label: dict.fromkeys(groups, 0.0) for label in merged or {}}
    for key, reference, taus in iter_task_vectors(theta0, specialists, names):
        if taus is None:
            continue
        group = layer_group(key)
        energies = taus.reshape(len(names), -1).square().sum(1).tolist()
        for name, energy in zip(names, energies, strict=True):
            task[name][group] += energy
        if key in components.core:
            core[group] += float(components.core[key].square().sum())
            residual[group] += float(components.residual[key].square().sum())
        for label, state in (merged or {}).items():
            delta = state[key].to(torch.float64) - reference.to(torch.float64)
            deltas[label][group] += float(delta.square().sum())
    return {"groups": groups, "task_vectors": task, "core": core, "residual": residual, "merged_delta": deltas}


def residual_spectra(components: Components, top: int = 32) -> dict[str, Any]:
    """Per matrix (a fused qkv as its q, k and v blocks, named ``<key>:q`` ...) and family: the residual energy
    before and after truncation, the fraction kept, and the ``top`` leading singular values before and after.

    Needs `components(..., spectra=True)`. ``kept_rank`` is q of the truncation (None when truncation is off).
    """
    if not components.spectra and components.diagnostics.get("n_matrix_keys", 0):
        raise ValueError("the R²M components were computed without spectra: call components(..., spectra=True)")
    if top < 1:
        raise ValueError(f"top must be ≥ 1 singular values, got {top}")
    kept = components.diagnostics.get("kept_rank", {})
    matrices: dict[str, Any] = {}
    kept_by_group: dict[str, dict[str, list[float]]] = {}
    for key, (before, after) in components.spectra.items():
        blocks = before.shape[1]
        labels = [f"{key}:{QKV[b]}" for b in range(blocks)] if is_fused_qkv(key) and blocks == 3 else [key]
        for b, label in enumerate(labels):
            families = {}
            for i, name in enumerate(components.names):
                s_before, s_after = before[i, b], after[i, b]  # (r,) descending
                e_before, e_after = float(s_before.square().sum()), float(s_after.square().sum())
                families[name] = {
                    "energy_before": e_before,
                    "energy_after": e_after,
                    "energy_kept": e_after / e_before if e_before > 0 else None,
                    "before": s_before[:top].tolist(),
                    "after": s_after[:top].tolist(),
                }
            matrices[label] = {"key": key, "group": layer_group(key), "kept_rank": kept.get(key), "families": families}
        group = kept_by_group.setdefault(layer_group(key), {name: [0.0, 0.0] for name in components.names})
        for i, name in enumerate(components.names):
            group[name][0] += float(before[i].square().sum())
            group[name][1] += float(after[i].square().sum())
    energy_kept = {
        group: {name: (after / before if before > 0 else None) for name, (before, after) in by_name.items()}
        for group, by_name in kept_by_group.items()
    }
    return {"top": top, "matrices": matrices, "energy_kept_by_group": energy_kept}


def spectra_report(
    theta0: StateDict,
    specialists: Mapping[str, StateDict],
    components: Components,
    merged: Mapping[str, StateDict] | None = None,
    top: int = 32,
) -> dict[str, Any]:
    """All of the above in one JSON-serialisable dict (keys: gram, real_subspace, blocks, residual_spectra)."""
    return {
        "gram": gram_spectrum(components),
        "real_subspace": real_subspace_energy(components),
        "blocks": block_energy(theta0, specialists, components, merged),
        "residual_spectra": residual_spectra(components, top),
    }


def matrix_labels(report: Mapping[str, Any]) -> Sequence[str]:
    """The matrices of a `residual_spectra` report in network order (their layer group, then the key's order)."""
    matrices = report["matrices"]
    groups = groups_of(entry["key"] for entry in matrices.values())
    order = {group: i for i, group in enumerate(groups)}
    return sorted(matrices, key=lambda label: order[matrices[label]["group"]])
