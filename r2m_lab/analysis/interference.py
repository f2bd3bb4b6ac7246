"""Per-layer interference: which layer group of the merged model costs a specialist its own family?

For specialist i and layer group g (`layers.layer_group`: embed, block<j>, post, and the head), the hybrid keeps
θᵢ everywhere but g, which takes θ*'s weights (the head group: the merged head on θᵢ's backbone). Its AUC on family
i minus θᵢ's own AUC there is the interference g carries: near 0, merging that group costs nothing; strongly
negative, the merged weights of that group undo what the specialist learned. The merged model's AUC on the family
is reported beside it, for scale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from r2m_lab.analysis.layers import HEAD, groups_of, swap_group

StateDict = Mapping[str, Tensor]
FamilyScore = Callable[[str, StateDict, Mapping[str, Tensor]], float | None]


def _delta(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def layer_interference(
    specialists: Mapping[str, StateDict],
    heads: Mapping[str, Mapping[str, Tensor]],
    merged: StateDict,
    merged_head: Mapping[str, Tensor],
    score: FamilyScore,
    groups: Sequence[str] | None = None,
    desc: str | None = "interference",
) -> dict[str, Any]:
    """AUC change per family and layer group (module docstring).

    specialists, heads: by family (the family each was fine-tuned on, which ``score`` knows how to evaluate);
    merged, merged_head: θ*'s backbone and head; score(family, backbone, head): AUC on that family's frames, None if
    they hold one class. groups: default every backbone group in network order, then ``head``.
    """
    missing = sorted(set(specialists) ^ set(heads))
    if missing:
        raise ValueError(f"specialists and heads name different families: {missing}")
    groups = list(groups) if groups is not None else [*groups_of(merged), HEAD]
    families: dict[str, Any] = {}
    for family in tqdm(list(specialists), desc=desc, leave=False, disable=desc is None):
        backbone, head = specialists[family], heads[family]
        own = score(family, backbone, head)
        swapped = {}
        for group in groups:
            if group == HEAD:
                swapped[group] = score(family, backbone, merged_head)
            else:
                swapped[group] = score(family, swap_group(backbone, merged, group), head)
        families[family] = {
            "specialist_auc": own,
            "merged_auc": score(family, merged, merged_head),
            "swapped_auc": swapped,
            "delta": {group: _delta(auc, own) for group, auc in swapped.items()},
        }
    return {"groups": groups, "families": families}
