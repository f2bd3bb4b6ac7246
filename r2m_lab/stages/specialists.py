"""What a merge or a reference row needs before it can start: θ₀, every specialist of the benchmark, or the joint
model. ``train_missing=true`` trains whatever of these is missing; otherwise a missing one stops the run
with the commands (this run's recipe overrides included) that create it."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from r2m_lab.stages.artifacts import base_path, command, specialist_path, specialists_dir

log = logging.getLogger(__name__)


def ensure_specialists(cfg: DictConfig, specialists: bool = True, joint: bool = False) -> None:
    """Make sure the benchmark's specialists (``specialists``) and its joint model (``joint``: the reference row that
    stage=evaluate stage.model=joint scores) exist for this config.

    Missing ones are trained (θ₀ first, if it is missing too) when ``train_missing`` is true, reusing any that
    already match; otherwise a :class:`FileNotFoundError` lists the commands that create them. Existing files are
    left as they are (the merge checks that they share θ₀).
    """
    from r2m_lab.stages.finetune import train_detector  # a training import only where training may happen

    wanted = {str(d.name): ("specialist", d) for d in cfg.benchmark.specialists.values()} if specialists else {}
    if joint:
        if cfg.benchmark.get("joint") is None:
            raise ValueError(f"benchmark {cfg.benchmark.name} has no joint data config (benchmark.joint)")
        wanted[str(cfg.benchmark.joint.name)] = ("joint", cfg.benchmark.joint)
    missing = {name: spec for name, spec in wanted.items() if not specialist_path(cfg, name).is_file()}
    if not missing:
        if cfg.get("train_missing", False) and not base_path(cfg).is_file():
            from r2m_lab.stages.base_model import ensure_base

            ensure_base(cfg)  # θ₀ alone was deleted: the same recipe recreates it (the merge then checks its hash)
        return
    if not cfg.get("train_missing", False):
        commands = "\n".join(f"  {command('stage=finetune', f'data={name}')}" for name in missing)
        raise FileNotFoundError(
            f"{len(missing)} detector(s) this run needs were never trained for benchmark {cfg.benchmark.name}, "
            f"seed {cfg.seed} under this recipe (looked in {specialists_dir(cfg) / f'seed{cfg.seed}'}): "
            f"{sorted(missing)}. Train them first:\n{commands}\n"
            f"or add train_missing=true to train them as part of this run, or run the whole method: {command()}"
        )
    for name, (kind, data_cfg) in missing.items():
        log.info("train_missing=true: training the missing %s %s first", kind, name)
        train_detector(cfg, data_cfg, kind=kind, reuse=True)
