"""A merger's config node: its name, its hyper-parameters and their check before any checkpoint is read."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from r2m_lab.stages.config_nodes import plain


def merger_name(merger_cfg: Mapping[str, Any]) -> str:
    """``r2m_lab.mergers.r2m.merge`` → ``r2m``: the merger's name is its module, so no second registry is needed."""
    return str(merger_cfg["_target_"]).split(".")[-2]


def merger_hparams(merger_cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in plain(merger_cfg).items() if not k.startswith("_")}


# Reference rows that are configured like mergers but combine nothing in weight space (conf/merger/{ensemble,joint}):
# the stages score the specialists (ensemble) or the jointly trained detector (joint) instead of a merged checkpoint.
REFERENCE_MERGERS = ("ensemble", "joint")


def is_reference(merger_cfg: Mapping[str, Any]) -> bool:
    return merger_name(merger_cfg) in REFERENCE_MERGERS


def validate_merger(cfg: DictConfig, merger_cfg: Mapping[str, Any]) -> None:
    """Run the merger module's ``validate`` on the configured hyper-parameters: bad knobs fail before any work.

    ``n_tasks`` (the benchmark's number of specialists) is passed to validators that take it (R²M's k ≤ N).
    """
    module = importlib.import_module(str(merger_cfg["_target_"]).rsplit(".", 1)[0])
    validate = getattr(module, "validate", None)
    if validate is None:
        raise ValueError(f"merger module {module.__name__} has no validate(): every merger checks its knobs")
    hparams = merger_hparams(merger_cfg)
    if "n_tasks" in inspect.signature(validate).parameters:
        hparams["n_tasks"] = len(cfg.benchmark.specialists)
    try:
        validate(**hparams)
    except TypeError as err:  # an unknown knob name (a typo in an override)
        raise ValueError(f"merger={merger_name(merger_cfg)}: {err}") from err
