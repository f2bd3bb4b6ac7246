"""Training checkpoints of a fine-tune: written periodically and atomically, verified before a resume.

A checkpoint is Lightning's own (model, optimiser, LR schedulers, loop progress, the train loader's data-order state:
see :class:`~r2m_lab.data.loaders.ResumableLoader`) plus what :class:`TrainingState` adds: the global RNG states and the
training fingerprint of the run that wrote it. It lives beside the detector it will become
(``specialists/<tag>/seed<seed>/<data>.ckpt``), is replaced in place at each save (temp file + ``os.replace``, so a
killed write leaves the previous checkpoint whole), is read only with ``torch.load(weights_only=True)``, and is deleted
once the detector's safetensors and card are written (they hold everything the checkpoint did that anything reads;
an optimiser state doubles a ViT-L's size on disk).

``resume`` (conf/config.yaml) decides what a fine-tune does with a checkpoint it finds: ``auto`` continues from it when
it comes from the same config (same fingerprint) and starts over otherwise; ``true`` must continue, and refuses before
anything trains when there is no checkpoint or one from another config; ``false`` starts over.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from r2m_lab.atomic import atomic_path

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", True, False)
_KEY = "r2m_lab"  # the checkpoint's entry that says which run wrote it


class NonFiniteLoss(RuntimeError):
    """The training loss (or the weights about to be checkpointed) turned NaN or infinite."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on a local disk.

    Lightning's own writer goes through an fsspec transaction, whose local temp file is made by ``mkstemp`` in the
    system temp folder: the final move is a copy when that folder is on another file system (and nothing is fsynced),
    so a kill can leave a truncated checkpoint under the real name. Here the file is written beside its target,
    flushed to disk, then renamed over it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())


class TrainingState(Callback):
    """What a Lightning checkpoint lacks for an exact resume, and the stop on a non-finite loss.

    Saved: the fingerprint and training record of this run (so a resume can refuse a checkpoint of another config)
    and the torch (CPU and CUDA), numpy and Python RNG states. The RNG states are put back just before the first batch
    after a resume, where an uninterrupted run has them (restoring them earlier would let the loader setup draw from
    them). A loss that is not finite stops the run (on every rank) before that step can be checkpointed, and the
    weights are checked before each save, so the last checkpoint written is always a finite one.
    """

    def __init__(self, fingerprint: str, record: Mapping[str, Any], frames: Any, data_name: str, path: Path) -> None:
        self.fingerprint = fingerprint
        self.record = dict(record)
        self.frames = frames  # the training FrameSet: names the frames of a batch whose loss is not finite
        self.data_name = data_name
        self.path = path
        self.saved_step: int | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saved_step = int(checkpoint["global_step"])

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        bad = loss is not None and not bool(torch.isfinite(loss).all())
        # Every rank stops together: a rank that raised alone would leave the others waiting in the next all-reduce.
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise NonFiniteLoss(self._nonfinite_message(f"the training loss is {_value(loss)}", trainer, batch))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = [name for name, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise NonFiniteLoss(
                self._nonfinite_message(f"{len(bad)} weight tensors are not finite (first: {bad[0]})", trainer, None)
            )
        checkpoint[_KEY] = {"fingerprint": self.fingerprint, "training": self.record}
        self.saved_step = int(trainer.global_step)

    def _nonfinite_message(self, what: str, trainer: L.Trainer, batch: Any) -> str:
        frames = ""
        if batch is not None:
            index = batch[2].detach().cpu().numpy()  # (B,) frame indices into the training FrameSet
            keys = [str(k) for k in self.frames.keys[index][:8]]
            frames = f" on a batch of {len(index)} frames of {self.data_name} (train), first: {', '.join(keys)}"
        kept = (
            f"The last good training checkpoint (step {self.saved_step}) is kept at {self.path}."
            if self.saved_step is not None and self.path.is_file()
            else "No training checkpoint had been written yet."
        )
        return (
            f"Training stopped at step {trainer.global_step}: {what}{frames}. {kept} Look for a learning rate too "
            "large for this backbone (backbone.recipe.optimizer.lr), a precision that overflows (trainer.precision) "
            "or frames that decode to nothing; a changed recipe is another config and starts over (resume=false)."
        )


def _value(loss: Any) -> str:
    return "missing" if loss is None else str(loss.detach().float().cpu().item())


def rng_states() -> dict[str, Any]:
    """The global RNG states as tensors and plain numbers (what ``torch.load(weights_only=True)`` reads back)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
        | {"has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_path(specialist_file: Path) -> Path:
    """The training checkpoint of the detector at ``specialist_file`` (``<data>.safetensors`` → ``<data>.ckpt``)."""
    return specialist_file.with_suffix(".ckpt")


def checkpoint_callback(path: Path, every: Mapping[str, Any]) -> ModelCheckpoint | None:
    """Lightning's ModelCheckpoint writing ``path`` (replaced at each save) at the ``checkpoint`` config's interval;
    None when both intervals are off."""
    steps, minutes = every.get("every_n_steps"), every.get("every_minutes")
    if steps and minutes:
        raise ValueError(
            f"checkpoint.every_n_steps={steps} and checkpoint.every_minutes={minutes}: set one of them (the other null)"
        )
    if not steps and not minutes:
        return None
    callback = ModelCheckpoint(
        dirpath=str(path.parent),
        save_top_k=0,  # no "best" files: only the one checkpoint below, replaced at each save
        save_last=True,
        every_n_train_steps=int(steps) if steps else None,
        train_time_interval=timedelta(minutes=float(minutes)) if minutes else None,
        enable_version_counter=False,
    )
    callback.CHECKPOINT_NAME_LAST = path.stem  # the file is <dirpath>/<CHECKPOINT_NAME_LAST>.ckpt
    return callback


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded with ``weights_only=True`` (no code is unpickled), or a clear error when it
    is unreadable or was not written by a fine-tune of this project."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(
            f"The training checkpoint {path} cannot be read ({type(err).__name__}: {err}). Checkpoints are "
            "written to a temp file and renamed, so a killed save leaves none under this name: this one was copied "
            "or truncated by something else. Nothing was trained. Delete it, or run with resume=false to start over "
            "(which replaces or removes it)."
        ) from err
    if not isinstance(ckpt, dict) or _KEY not in ckpt or "global_step" not in ckpt:
        raise ValueError(
            f"{path} is not a training checkpoint of an r2m_lab fine-tune (no '{_KEY}' record or no global_step). "
            "Nothing was trained. Move it away, or run with resume=false to start over (which replaces or removes it)."
        )
    return ckpt


def resume_mode(cfg: Any) -> str | bool:
    mode = cfg.get("resume", "auto")
    if mode not in RESUME_MODES:
        raise ValueError(f"resume={mode!r}: use auto, true or false")
    return mode


def refuse_missing(path: Path, mode: str | bool) -> None:
    """``resume=true`` with no checkpoint at ``path``: say where it looked, before anything (θ₀ included) is built."""
    if mode is True and not path.is_file():
        raise FileNotFoundError(
            f"resume=true, but there is no training checkpoint at {path}: nothing to continue, and nothing was "
            "trained. A fine-tune writes one there every checkpoint.every_n_steps steps or checkpoint.every_minutes "
            "minutes and deletes it once the detector is written; this config (seed, data, recipe, "
            "paths.artifacts_dir) has none pending. Run without resume=true to start (resume=auto continues when one "
            "is there)."
        )


def resume_from(
    path: Path, mode: str | bool, fingerprint: str, record: Mapping[str, Any], differences: Any
) -> tuple[Path | None, int]:
    """(checkpoint to continue from or None, its step) for ``resume=mode``.

    ``differences(old_record, new_record)`` lists what differs between two training records (for the refusal).
    """
    if not path.is_file():
        refuse_missing(path, mode)
        return None, 0
    if mode is False:
        log.warning("resume=false: starting over; the training checkpoint %s will be replaced", path)
        return None, 0
    ckpt = read_checkpoint(path)
    found = ckpt[_KEY].get("fingerprint")
    step = int(ckpt["global_step"])
    if found != fingerprint:
        lines = "\n".join(f"  {d}" for d in differences(ckpt[_KEY].get("training"), record))
        what = f"The training checkpoint {path} (step {step}) comes from another config (fingerprint {found}, this "
        what += f"config gives {fingerprint}). What differs:\n{lines}\n"
        if mode is True:
            raise ValueError(
                what + "Nothing was trained. Continue it with the config that wrote it, or start over with "
                "resume=false (or resume=auto), which replaces it."
            )
        log.warning("%sresume=auto: starting over; it will be replaced.", what)
        return None, 0
    return path, step
