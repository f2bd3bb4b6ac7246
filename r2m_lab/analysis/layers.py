"""Layer groups of a timm ViT: where in the network a key sits, for energy per block and per-layer interference.

A key belongs to ``embed`` (patch embedding, class/register tokens, position embedding, the pre-norm CLIP puts
before the blocks), to ``block<i>`` (everything under ``blocks.<i>.``) or to ``post`` (what follows the blocks: the
final norm, a pooling norm). The real/fake head is not a backbone key; per-layer interference adds it as ``head``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import Tensor

EMBED, POST, HEAD = "embed", "post", "head"
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED_PARTS = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")


def layer_group(key: str) -> str:
    """``embed``, ``block<i>`` or ``post`` for one backbone key (module docstring)."""
    match = _BLOCK.search(key)
    if match:
        return f"block{int(match.group(1))}"
    if any(part in _EMBED_PARTS for part in key.split(".")):
        return EMBED
    return POST


def _rank(group: str) -> tuple[int, int, str]:
    if group == EMBED:
        return (0, 0, group)
    if group.startswith("block") and group[5:].isdigit():
        return (1, int(group[5:]), group)
    if group == POST:
        return (2, 0, group)
    return (3 if group == HEAD else 4, 0, group)


def ordered_groups(groups: Iterable[str]) -> list[str]:
    """Distinct groups in network order: embed, block0, block1, ..., post, head, then anything else by name."""
    return sorted(set(groups), key=_rank)


def groups_of(keys: Iterable[str]) -> list[str]:
    """The layer groups the keys fall into, in network order."""
    return ordered_groups(layer_group(key) for key in keys)


def swap_group(specialist: Mapping[str, Tensor], merged: Mapping[str, Tensor], group: str) -> dict[str, Tensor]:
    """The specialist's backbone with the keys of ``group`` taken from the merged one (same keys, checked)."""
    if set(specialist) != set(merged):
        missing = sorted(set(specialist) ^ set(merged))
        raise ValueError(f"the specialist and the merged backbone have different keys (e.g. {missing[:3]})")
    if all(layer_group(key) != group for key in specialist):
        raise ValueError(f"no backbone key is in layer group {group!r}; the groups are {groups_of(specialist)}")
    return {key: (merged if layer_group(key) == group else specialist)[key] for key in specialist}
