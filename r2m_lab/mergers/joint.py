"""Joint training ("all-in-one"): a reference row, not a merge. θ_joint is one detector trained on the union of the
families' data (``stage=finetune data=<benchmark.joint>``), the retraining that merging is meant to avoid.

The R²M paper (arXiv 2509.24367) compares against it in every table. ``merger=joint`` makes ``stage=evaluate``
score the joint checkpoint; ``stage=merge`` writes no new weights and records how the joint task vector relates to
the specialists' (``merge`` below), which says how much of joint training a weight-space merge could recover.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import Tensor

from r2m_lab.mergers.task_vectors import (
    MergeResult,
    check_heads,
    check_keys,
    cosines_from_gram,
    family_names,
    gram,
    iter_task_vectors,
)


def validate() -> None:
    """Joint training has no merge hyper-parameters: nothing to check."""


def merge(
    theta0: Mapping[str, Tensor],
    specialists: Mapping[str, Mapping[str, Tensor]],
    heads: Mapping[str, Mapping[str, Tensor]],
    *,
    joint: Mapping[str, Tensor],
    joint_head: Mapping[str, Tensor],
) -> MergeResult:
    """θ_joint unchanged, with diagnostics: ‖τ_joint‖, ‖τᵢ‖ and the cosines between τ_joint and every τᵢ.

    The joint model must descend from the same θ₀ (same keys, shapes and dtypes); streams one key at a time.
    """
    start = time.perf_counter()
    names = family_names(specialists)
    check_heads(heads, names)
    models = {**specialists, "joint": joint}
    if "joint" in specialists:
        raise ValueError("a specialist may not be named 'joint': the name is reserved for the joint model")
    check_keys(theta0, models)
    order = family_names(models)
    total = torch.zeros(len(order), len(order), dtype=torch.float64)
    for _, _, taus in iter_task_vectors(theta0, models, order):
        if taus is not None:
            total += gram(taus)
    cosines = cosines_from_gram(total)
    j = order.index("joint")
    norms = total.diagonal().clamp_min(0).sqrt().tolist()
    diagnostics = {
        "merger": "joint",
        "families": names,
        "joint_task_vector_norm": norms[j],
        "task_vector_norms": {n: norms[order.index(n)] for n in names},
        "cosine_with_joint": {n: cosines[j][order.index(n)] for n in names},
        "timings_s": {"total": time.perf_counter() - start},
    }
    backbone = {key: joint[key] for key in theta0}
    return MergeResult(backbone=backbone, head=dict(joint_head), diagnostics=diagnostics)
