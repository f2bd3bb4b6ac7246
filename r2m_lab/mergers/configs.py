"""Finding, loading and building mergers from their configs: ``conf/merger/<name>.yaml`` is the one list.

Every stage, the pipeline, the merger sweep (``merger: glob(*)``), the benchmark script and the invariant tests ask
`merger_names` which mergers exist, so a new YAML file with its module joins all of them without another edit.
A merger's YAML holds its defaults, ``_target_`` (its `Merger` class; the module's last name is the merger's name
and must equal the file's stem) and ``_select_`` (not a knob: the grid stage=pipeline chooses on the validation
split, ``null`` for a merger without a scalar to choose). OmegaConf only, imported when called: no Hydra here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from r2m_lab.mergers.contract import Merger

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the project's config folder (a source checkout)
GROUP = "merger"
SELECT_KEY = "_select_"  # the validation grid of stage=pipeline: configuration of the run, not of the merge
NOT_KNOBS = ("_target_", SELECT_KEY)


def config_dirs(extra: Sequence[Path | str] = ()) -> list[Path]:
    """The folders whose ``merger/`` subfolder holds merger YAMLs: the project's ``conf/``, then Hydra's search path
    when a Hydra app is running (``hydra.searchpath`` adds folders), then ``extra``; duplicates dropped."""
    dirs = [CONF_DIR]
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            dirs += [Path(s.path) for s in HydraConfig.get().runtime.config_sources if s.schema == "file" and s.path]
    except ImportError:  # Hydra is optional for library use
        pass
    dirs += [Path(d) for d in extra]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def merger_paths(dirs: Sequence[Path | str] | None = None) -> dict[str, Path]:
    """Every merger, name → its YAML, sorted by name; a name found twice is refused (which file would win?)."""
    found: dict[str, Path] = {}
    for folder in config_dirs() if dirs is None else [Path(d) for d in dirs]:
        for path in sorted((Path(folder) / GROUP).glob("*.yaml")):
            if path.stem in found and found[path.stem].resolve() != path.resolve():
                raise ValueError(f"merger {path.stem!r} is configured twice: {found[path.stem]} and {path}")
            found[path.stem] = path
    return dict(sorted(found.items()))


def merger_names(dirs: Sequence[Path | str] | None = None) -> list[str]:
    """The names of every merger that exists (the stems of ``<dir>/merger/*.yaml``), sorted."""
    return list(merger_paths(dirs))


def merger_name(node: Mapping[str, Any]) -> str:
    """``r2m_lab.mergers.r2m.R2M`` → ``r2m``: a merger's name is its module's, so no second registry is needed."""
    target = str(node.get("_target_", ""))
    if target.count(".") < 1:
        raise ValueError(f"a merger config needs _target_: <module>.<Merger class>, got {target!r}")
    return target.split(".")[-2]


def merger_hparams(node: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs of a merger config (every key but ``_target_``, ``_select_`` and other ``_x_`` keys)."""
    return {k: v for k, v in _plain(node).items() if not str(k).startswith("_")}


def load_merger_config(
    name: str,
    dirs: Sequence[Path | str] | None = None,
    root: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """``conf/merger/<name>.yaml`` as a plain, resolved dict with ``overrides`` (knob=value) applied.

    Interpolations such as r2m's ``rank_ratio: ${rank_ratio}`` resolve against ``root`` (the run's whole config),
    or against ``conf/config.yaml``'s top-level values when no config is given. An override for a key the YAML
    does not have is refused, naming the knobs it has.
    """
    from omegaconf import OmegaConf

    paths = merger_paths(dirs)
    if name not in paths:
        raise ValueError(f"no merger named {name!r}; the mergers are {', '.join(paths)}")
    node = OmegaConf.load(paths[name])
    if merger_name(node) != name:
        raise ValueError(f"{paths[name]} targets {node['_target_']}: a merger's module must be named like its YAML")
    unknown = sorted(set(overrides) - set(node))
    if unknown:
        raise ValueError(f"merger={name}: unknown knob(s) {unknown}; its knobs are {sorted(merger_hparams(node))}")
    if root is None:
        root = OmegaConf.load(CONF_DIR / "config.yaml")
    holder = OmegaConf.create(OmegaConf.to_container(root, resolve=False) if OmegaConf.is_config(root) else root)
    holder["_merger_being_loaded_"] = node  # so ${...} inside it resolves against the root, as Hydra composes it
    resolved = OmegaConf.to_container(holder["_merger_being_loaded_"], resolve=True)
    resolved.update(overrides)
    return resolved


def build_merger(node: Mapping[str, Any], n_tasks: int | None = None) -> Merger:
    """The `Merger` a config describes (``_target_`` called with the knobs), checked with ``n_tasks`` if given.

    Every refusal is a ValueError that names the merger: an unknown or missing knob, a ``_target_`` that is not a
    `Merger`, and whatever the merger's own ``check`` refuses. Reads no checkpoint.
    """
    plain = _plain(node)
    name = merger_name(plain)
    module_name, class_name = str(plain["_target_"]).rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise ValueError(f"merger={name}: _target_ {plain['_target_']} is not a merger dataclass")
    knobs = merger_hparams(plain)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown, missing = sorted(set(knobs) - set(fields)), sorted(set(fields) - set(knobs))
    if unknown or missing:
        raise ValueError(
            f"merger={name}: "
            + "; ".join(
                part
                for part in (
                    f"unknown knob(s) {unknown}" if unknown else "",
                    f"missing knob(s) {missing}" if missing else "",
                )
                if part
            )
            + f"; its knobs are {fields}"
        )
    merger = cls(**knobs)
    if not isinstance(merger, Merger):
        raise ValueError(f"merger={name}: {plain['_target_']} does not meet the Merger protocol (check, __call__)")
    merger.check(n_tasks=n_tasks)
    return merger


def load_merger(name: str, dirs: Sequence[Path | str] | None = None, **overrides: Any) -> Merger:
    """The merger ``name`` with its YAML's defaults and ``overrides``: what tests, notebooks and scripts call."""
    return build_merger(load_merger_config(name, dirs, **overrides))


def selection_grid(node: Mapping[str, Any]) -> dict[str, list[Any]] | None:
    """A merger config's validation grid (``_select_``), or None; refused unless every key is one of its knobs."""
    plain = _plain(node)
    if SELECT_KEY not in plain:
        raise ValueError(
            f"merger={merger_name(plain)} declares no {SELECT_KEY}: give its validation grid, or null if it has none"
        )
    grid = plain[SELECT_KEY]
    if grid is None:
        return None
    unknown = sorted(set(grid) - set(merger_hparams(plain)))
    if unknown:
        raise ValueError(f"merger={merger_name(plain)}: {SELECT_KEY} names {unknown}, which are not its knobs")
    return dict(grid)


def _plain(node: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
