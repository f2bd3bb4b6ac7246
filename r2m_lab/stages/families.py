"""A benchmark restricted to some of its forgery families: what the scaling and expansion tables merge.

``stage.families=[swap,reenact]`` (or :func:`restrict_benchmark` in Python) turns the benchmark into one whose
specialists, validation sets and joint model cover those families only. Nothing the user configured is dropped: a
test set of a family left out of the merge moves from protocol ``P`` to protocol ``P_left_out``, so the table shows
what the merge gives on families it never saw beside the benchmark's own unseen sets. Family keys are the keys of
``benchmark.specialists`` (``swap``, ``fs``, ``df``...); the families always keep the benchmark's order, so the same
set of families gives the same merged-checkpoint path whatever order it was written in.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from r2m_lab.stages.config_nodes import plain

log = logging.getLogger(__name__)

LEFT_OUT = "_left_out"  # protocol suffix of the test sets of families left out of the merge
CONCAT_SOURCE = "r2m_lab.data.sources.ConcatSource"


def family_keys(cfg: DictConfig) -> list[str]:
    """The benchmark's family keys, in its order (one specialist each)."""
    return [str(k) for k in cfg.benchmark.specialists]


def chosen_families(cfg: DictConfig, value: Any) -> list[str]:
    """``all`` or a list of family keys (checked, duplicates refused), in the benchmark's order."""
    keys = family_keys(cfg)
    if value is None or value == "all":
        return keys
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"stage.families must be `all` or a list of the benchmark's families {keys}, got {value!r}")
    names = [str(v) for v in value]
    unknown = sorted(set(names) - set(keys))
    if unknown:
        raise ValueError(f"stage.families names {unknown}, which benchmark {cfg.benchmark.name} lacks; it has {keys}")
    if len(set(names)) != len(names):
        raise ValueError(f"stage.families lists a family twice: {names}")
    if len(names) < 2:
        raise ValueError(f"stage.families={names}: a merge needs at least two families (the benchmark has {keys})")
    return [k for k in keys if k in names]


def joint_name(cfg: DictConfig, families: Sequence[str]) -> str:
    """The joint model's data name for a family subset: ``<benchmark joint name>-<family+family...>``."""
    return f"{cfg.benchmark.joint.name}-{'+'.join(families)}"


def restrict_benchmark(cfg: DictConfig, families: Sequence[str]) -> DictConfig:
    """A copy of ``cfg`` whose benchmark holds only ``families`` (family keys, see :func:`chosen_families`).

    - ``specialists`` and ``validation`` keep only those keys (a validation set of another family is moved out too:
      selection must not look at a family the merge does not hold);
    - every protocol's sets of the other families move to ``<protocol>_left_out`` (nothing is dropped);
    - the joint model becomes the union of the chosen families' training data (a ``ConcatSource`` of their data
      configs, named by :func:`joint_name`), so "joint retraining on the union" is the same data the specialists saw.

    All families: ``cfg`` itself, unchanged (the full benchmark's joint model and paths are the ones reused).
    """
    keys = family_keys(cfg)
    families = chosen_families(cfg, list(families))
    if families == keys:
        return cfg
    out = copy.deepcopy(cfg)  # the whole root, so ${...} inside the data configs still resolves
    bench = plain(cfg.benchmark)
    left = [k for k in keys if k not in families]
    restricted = {k: bench["specialists"][k] for k in families}
    validation = {k: v for k, v in bench["validation"].items() if k not in left}
    protocols: dict[str, dict[str, Any]] = {}
    for protocol, sets in bench["protocols"].items():
        kept = {k: v for k, v in sets.items() if k not in left}
        moved = {k: v for k, v in sets.items() if k in left}
        if kept:
            protocols[protocol] = kept
        if moved:
            protocols[f"{protocol}{LEFT_OUT}"] = moved
    with open_dict(out):
        out.benchmark.specialists = OmegaConf.create(restricted)
        out.benchmark.validation = OmegaConf.create(validation)
        out.benchmark.protocols = OmegaConf.create(protocols)
        if cfg.benchmark.get("joint") is not None:
            out.benchmark.joint = OmegaConf.create(
                {
                    "_target_": CONCAT_SOURCE,
                    "name": joint_name(cfg, families),
                    "parts": restricted,
                    "families": families,
                }
            )
    log.info("benchmark %s restricted to families %s (left out: %s)", cfg.benchmark.name, families, left)
    return out
