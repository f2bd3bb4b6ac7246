"""Trainer presets (``conf/trainer/``): the checks a preset gets before anything trains, and the GPU speed switches.

:func:`build_trainer` is the presets' ``_target_``: it takes Lightning's Trainer arguments plus r2m_lab's own
switches (``compile``, ``channels_last``, ``fused_optimizer``; ``pin_memory`` and ``persistent_workers`` belong to
the data loaders, see :func:`loader_options`), refuses a GPU preset on a machine without one, and runs a DDP preset
that finds one device as a single process, with a warning.

Distributed runs use Lightning's own launcher: ``trainer=ddp`` re-runs the same command once per extra device (the
children write into the same Hydra run folder, ``hydra.output_subdir=null``), and every rank must reach the same
``Trainer.fit`` calls in the same order. ``stage=finetune`` (one fit) is the stage that runs that way; the stages that
train several models and then merge or evaluate refuse a world size above one (:func:`require_single_fit_stage`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

GPU_ACCELERATORS = ("gpu", "cuda")
# How to run the DDP preset without a GPU (the test suite's form): gloo, one process per device.
CPU_DDP = "trainer=ddp trainer.accelerator=cpu trainer.devices=2 trainer.precision=32-true"
# How long a rank other than 0 waits for rank 0 to write θ₀ when an external launcher (torchrun, srun) started every
# rank at once; a pretext θ₀ of the tiny backbone takes minutes, a CLIP conversion seconds.
BASE_WAIT_S = 3600.0


def preset_name() -> str:
    """``trainer=<name>`` as chosen on the command line (Hydra's runtime choice), for messages."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("trainer")
        if choice:
            return f"trainer={choice}"
    return "this trainer preset"


def require_accelerator(accelerator: str) -> None:
    """Refuse a GPU accelerator where torch sees no GPU, naming the CPU presets (before any training starts)."""
    if str(accelerator).lower() not in GPU_ACCELERATORS or torch.cuda.is_available():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else f"torch {torch.__version__}"
    raise RuntimeError(
        f"{preset_name()} asks for a GPU (trainer.accelerator={accelerator}), but this machine has none "
        f"(torch.cuda.is_available() is False; {why}). Use trainer=cpu for one CPU process, or `{CPU_DDP}` for DDP "
        "on CPU (two gloo processes)."
    )


def device_count(accelerator: str, devices: Any) -> int | None:
    """How many devices ``trainer.devices`` names on this machine (None: left to Lightning, e.g. ``-1`` on CPU)."""
    if not isinstance(devices, (int, str)):  # a list of device ids
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    gpu = str(accelerator).lower() in GPU_ACCELERATORS or (
        str(accelerator).lower() == "auto" and torch.cuda.is_available()
    )
    if text in ("-1", "auto"):
        return torch.cuda.device_count() if gpu else (1 if text == "auto" else None)
    return int(text)


def build_trainer(
    *,
    accelerator: str = "auto",
    devices: Any = 1,
    strategy: Any = "auto",
    num_nodes: int = 1,
    compile: bool = False,
    compile_options: Mapping[str, Any] | None = None,
    channels_last: bool = False,
    fused_optimizer: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    callbacks: list[L.Callback] | None = None,
    **trainer_kwargs: Any,
) -> L.Trainer:
    """A Lightning Trainer for a preset, after its checks.

    ``pin_memory`` and ``persistent_workers`` are accepted so that one preset holds every device choice; the data
    loaders read them from the config (:func:`loader_options`), the Trainer does not take them.
    """
    del pin_memory, persistent_workers  # read by loader_options (the data module), not a Trainer argument
    require_accelerator(accelerator)
    count = device_count(accelerator, devices)
    if isinstance(strategy, str) and strategy.startswith("ddp") and int(num_nodes) == 1 and count == 1:
        log.warning(
            "%s: trainer.strategy=%s with one device (trainer.accelerator=%s, trainer.devices=%s on this machine): "
            "running as a single process, without DDP.",
            preset_name(),
            strategy,
            accelerator,
            devices,
        )
        strategy, devices = "auto", 1
    speedups = Speedups(
        compile=bool(compile),
        compile_options=dict(compile_options or {}),
        channels_last=bool(channels_last),
        fused_optimizer=bool(fused_optimizer),
    )
    extra = [speedups] if speedups.active else []
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=int(num_nodes),
        callbacks=[*(callbacks or []), *extra],
        **trainer_kwargs,
    )


def loader_options(trainer_cfg: Mapping[str, Any]) -> dict[str, bool]:
    """The data loader switches of a trainer preset: pinned host memory (only when there is a GPU to copy to) and
    worker processes kept alive across epochs (only when ``num_workers`` > 0)."""
    return {
        "pin_memory": bool(trainer_cfg.get("pin_memory", False)) and torch.cuda.is_available(),
        "persistent_workers": bool(trainer_cfg.get("persistent_workers", True)),
    }


class Speedups(L.Callback):
    """The GPU preset's switches, applied to the module when fit starts (before the strategy wraps it and builds the
    optimizer):

    - ``channels_last``: 4-D weights (the ViT patch embedding, any conv) and the inputs in NHWC, the layout
      tensor-core convolutions run in under bf16;
    - ``fused_optimizer``: ``fused=True`` for the recipe's optimizer (Adam/AdamW/SGD: one kernel per step);
    - ``compile``: ``torch.compile`` on the backbone, in place (``nn.Module.compile``), so the state dict keeps its
      keys and the saved artifact is the same as without it; ``compile_options`` go to ``torch.compile``.
    """

    def __init__(
        self,
        compile: bool = False,
        compile_options: Mapping[str, Any] | None = None,
        channels_last: bool = False,
        fused_optimizer: bool = False,
    ) -> None:
        self.compile = compile
        self.compile_options = dict(compile_options or {})
        self.channels_last = channels_last
        self.fused_optimizer = fused_optimizer

    @property
    def active(self) -> bool:
        return self.compile or self.channels_last or self.fused_optimizer

    def record(self) -> dict[str, Any]:
        return {
            "compile": self.compile,
            "compile_options": self.compile_options,
            "channels_last": self.channels_last,
            "fused_optimizer": self.fused_optimizer,
        }

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
            pl_module.channels_last = True  # Detector.forward converts its input (B, 3, S, S) too
        if self.fused_optimizer:
            pl_module.optimizer_options = {**getattr(pl_module, "optimizer_options", {}), "fused": True}
        if self.compile:
            getattr(pl_module, "backbone", pl_module).compile(**self.compile_options)


def distributed_record(trainer: L.Trainer, global_batch_size: int) -> dict[str, Any]:
    """What a card records about how a model was trained: world size, strategy, devices, nodes, batch split, and
    the speed switches in effect."""
    speedups = next((c for c in trainer.callbacks if isinstance(c, Speedups)), Speedups())
    return {
        "world_size": int(trainer.world_size),
        "strategy": type(trainer.strategy).__name__,
        "accelerator": type(trainer.accelerator).__name__,
        "devices": int(trainer.num_devices),
        "num_nodes": int(trainer.num_nodes),
        "precision": str(trainer.precision),
        # the recipe's batch_size is the global batch (the paper's); each rank draws its share of every step
        "global_batch_size": int(global_batch_size),
        "per_device_batch_size": int(global_batch_size) // int(trainer.world_size),
        **speedups.record(),
    }


def require_single_fit_stage(stage: str, trainer: L.Trainer) -> None:
    """Refuse a world size above one outside ``stage=finetune`` (before anything trains or is launched).

    Lightning's DDP launcher re-runs the whole command on every rank; a stage that trains several models and then
    merges or evaluates would do its merging and evaluation once per rank.
    """
    if trainer.world_size <= 1 or stage == "finetune":
        return
    raise RuntimeError(
        f"{preset_name()} trains on {trainer.world_size} processes, which stage=finetune supports (one model per "
        f"command); stage={stage} trains several and then merges or evaluates, which would run once per process. "
        "Train each model that is missing first, e.g. `python -m r2m_lab stage=finetune data=<family> trainer=ddp` "
        f"(and data=<joint> for the joint model), then run stage={stage}: it reuses them (same fingerprint)."
    )


def launch_rank_is_zero() -> bool:
    """Whether this process is rank 0 as its launcher set it, before any trainer exists: every rank variable a
    launcher sets (torchrun, srun, Lightning's own children, a node of a multi-node run) is 0 or unset."""
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return all(int(os.environ.get(key) or 0) == 0 for key in keys)


def wait_for_file(path: Path, what: str, timeout_s: float = BASE_WAIT_S, poll_s: float = 2.0) -> Path:
    """On a rank other than 0: wait for rank 0 to write ``path`` (atomically: its appearance means it is whole)."""
    deadline = time.monotonic() + timeout_s
    if not path.is_file():
        log.info("Waiting for rank 0 to write %s (%s)", what, path)
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{what} {path} did not appear within {timeout_s:.0f} s: this process is not rank 0 and waits for "
                "rank 0 to create it. Create it first with one process (e.g. the same stage=finetune command with "
                "trainer=cpu or trainer=gpu), then launch the distributed run."
            )
        time.sleep(poll_s)
    return path
