"""Transforms (albumentations) and data loaders over :class:`~r2m_lab.data.sources.FrameSet`."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from r2m_lab.data.sources import FrameSet


def build_transform(input_cfg: Mapping[str, Any], augment: Sequence[A.BasicTransform] = (), seed: int = 0) -> A.Compose:
    """Augmentations (training only), then resize to the backbone's input and normalise as the backbone expects.

    albumentations draws from its own generator, not numpy's or torch's, so ``seed`` is what makes a run repeatable;
    a fine-tune re-seeds it for every draw (:class:`FrameDataset`, :class:`DrawSampler`).
    """
    size = int(input_cfg["input_size"])
    return A.Compose(
        [
            *augment,
            A.Resize(size, size),
            A.Normalize(mean=input_cfg["mean"], std=input_cfg["std"], max_pixel_value=255.0),
            ToTensorV2(),
        ],
        seed=seed,
    )


def build_augment(spec: Mapping[str, Any] | None) -> list[A.BasicTransform]:
    """The training augmentations of ``backbone.recipe.augment``: ``{name: {_target_: albumentations.X, ...}}``.

    Keyed by name so that every knob reads well as an override (``backbone.recipe.augment.flip.p=0``,
    ``backbone.recipe.augment.jpeg.quality_range=[60,100]``); an entry set to null is left out
    (``backbone.recipe.augment.blur=null``), and the transforms run in the order of the keys.
    """
    from hydra.utils import instantiate

    if spec is None:
        return []
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"backbone.recipe.augment must be a mapping {{name: {{_target_: albumentations.X, ...}}}}, got "
            f"{type(spec).__name__}"
        )
    transforms = []
    for name, entry in spec.items():
        if entry is None:
            continue
        transform = instantiate(entry)
        if not isinstance(transform, A.BasicTransform):
            raise TypeError(
                f"backbone.recipe.augment.{name} is a {type(transform).__name__}, not an albumentations transform"
            )
        transforms.append(transform)
    return transforms


class FrameDataset(Dataset):
    """(image tensor (3, S, S), label, frame index) per frame.

    A key is a frame index, or a training draw ``(augmentation seed, frame index)`` from :class:`DrawSampler`: the
    transform is then re-seeded for that draw, so a draw's augmentation is a pure function of its seed, whichever
    worker loads it and whether or not the run was resumed mid-epoch.
    """

    def __init__(self, frames: FrameSet, transform: A.Compose) -> None:
        self.frames = frames
        self.transform = transform

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        if isinstance(key, tuple):
            seed, i = key
            self.transform.set_random_seed(seed)
        else:
            i = key
        image = self.transform(image=self.frames.image(i))["image"]
        return image, int(self.frames.labels[i]), i


class DrawSampler(Sampler[tuple[int, int]]):
    """``num_samples`` draws per epoch with replacement: frames by ``weights`` (uniform when None), each with its own
    augmentation seed; yields ``(augmentation seed, frame index)``.

    An epoch's draws are a pure function of ``(seed, epoch)``, so a resumed run draws what an uninterrupted one would
    have. Lightning calls :meth:`set_epoch` before each epoch (under DDP through :class:`ResumableLoader`, see there);
    a sampler iterated without it moves to the next epoch by itself after each pass.
    """

    def __init__(self, weights: torch.Tensor | None, n_frames: int, num_samples: int, seed: int) -> None:
        self.weights = weights
        self.n_frames = n_frames
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0  # the epoch the next pass draws

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(frame indices (num_samples,), augmentation seeds (num_samples,)) of ``epoch``."""
        # Epoch 0 uses the seed itself: its frame order is what torch's WeightedRandomSampler drew with this seed.
        gen = torch.Generator().manual_seed(self.seed + _EPOCH_STRIDE * epoch)
        if self.weights is None:
            frames = torch.randint(self.n_frames, (self.num_samples,), generator=gen)
        else:
            frames = torch.multinomial(self.weights, self.num_samples, True, generator=gen)
        return frames, torch.randint(2**31, (self.num_samples,), generator=gen)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        frames, seeds = self.draws(epoch)
        return zip(seeds.tolist(), frames.tolist(), strict=True)

    def __len__(self) -> int:
        return self.num_samples


_EPOCH_STRIDE = 1_000_003  # a prime: epochs of nearby seeds do not share a generator seed


def balanced_sampler(labels: np.ndarray, num_samples: int, seed: int) -> DrawSampler:
    """Draw real and fake frames with equal probability (with replacement), whatever the class ratio of the data."""
    n_fake = int(labels.sum())
    n_real = len(labels) - n_fake
    if n_fake == 0 or n_real == 0:
        raise ValueError(f"Cannot balance classes: {n_real} real and {n_fake} fake frames")
    weights = np.where(labels == 1, 0.5 / n_fake, 0.5 / n_real)
    return DrawSampler(torch.as_tensor(weights, dtype=torch.double), len(labels), num_samples, seed)


class ResumableLoader(DataLoader):
    """A training DataLoader that a Lightning checkpoint can resume mid-epoch.

    It follows Lightning's "stateful" protocol (``state_dict`` / ``load_state_dict`` on a train loader are saved in a
    checkpoint and restored before iteration). The state is the sampler's epoch and how many batches of the current
    pass have left the loader (counted here, so batches that workers prefetched but training never saw are not
    counted). The next pass after a load skips that many batches in the batch sampler alone: their indices are drawn
    but no image is read or augmented. With :class:`DrawSampler`'s per-draw seeds the batches that follow are those
    an uninterrupted run sees.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skipping: _SkipFirst | None = None

    @property
    def _index_sampler(self) -> _SkipFirst:
        # One wrapper for the loader's life: an iterator with persistent workers keeps the object it first read.
        if self._skipping is None:
            self._skipping = _SkipFirst(super()._index_sampler)
        return self._skipping

    def __iter__(self) -> Iterator[Any]:
        self._served = self._index_sampler.skip
        inner = _wrapped_draw_sampler(self.sampler)
        if inner is not None:
            # Under DDP Lightning sets the epoch (restored on resume) on its DistributedSamplerWrapper; releases before
            # 2.6 do not pass it on to the sampler inside, which would then count passes from 0 after a resume.
            inner.set_epoch(self.sampler.epoch)
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int | None]:
        # A DrawSampler's epoch has moved on once its pass began. Under DDP the sampler is Lightning's wrapper, whose
        # epoch Lightning restores itself; __iter__ hands it to the DrawSampler inside.
        epoch = self.sampler.epoch - 1 if isinstance(self.sampler, DrawSampler) else None
        return {"epoch": epoch, "batches": self._served}

    def load_state_dict(self, state: Mapping[str, int | None]) -> None:
        epoch, batches = state["epoch"], int(state["batches"])
        if batches >= len(self):  # saved after the last batch of an epoch: the next pass is the next epoch, whole
            epoch, batches = None if epoch is None else epoch + 1, 0
        if epoch is not None and isinstance(self.sampler, DrawSampler):
            self.sampler.set_epoch(epoch)
        self._index_sampler.skip = batches


def _wrapped_draw_sampler(sampler: Any) -> DrawSampler | None:
    """The DrawSampler inside Lightning's ``DistributedSamplerWrapper`` (a DistributedSampler over a dataset holding
    the original sampler as ``_sampler``), or None for any other sampler."""
    if not isinstance(sampler, DistributedSampler):
        return None
    inner = getattr(sampler.dataset, "_sampler", None)
    return inner if isinstance(inner, DrawSampler) else None


class _SkipFirst:
    """A batch sampler whose next pass leaves out its first ``skip`` batches (then skips none again)."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.skip = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        it = iter(self.batches)
        for _ in itertools.islice(it, skip):
            pass
        return it


def require_both_classes(frames: FrameSet, role: str) -> None:
    """Refuse a training or validation split with frames of one class only, naming the split and its counts.

    A detector trained on one class learns to answer that class whatever it sees (a "specialist" that is a
    constant), and a threshold fitted on one class is meaningless; ``balanced`` or not, nothing can repair that.
    """
    if frames.n_real and frames.n_fake:
        return
    missing = "real" if not frames.n_real else "fake"
    raise ValueError(
        f"{role} split {frames.name} has {frames.n_real} real and {frames.n_fake} fake frames: no {missing} frame. "
        f"Training needs both classes (e.g. a per-method DF40 index with no real video in train): use an index that "
        f"lists {missing} videos in that split, or join one that does (a ConcatSource, as data=df40_joint does)."
    )


class DetectionDataModule(L.LightningDataModule):
    """Train on one FrameSet (class-balanced batches or plain random draws), validate on another.

    Both must hold real and fake frames (:func:`require_both_classes`), whatever ``balanced`` is. ``batch_size`` is
    the global batch: on a trainer of world size W each rank's loader draws ``batch_size / W`` frames per step from
    its shard of the sampler's ``num_samples`` draws (Lightning wraps the sampler in a DistributedSamplerWrapper), so
    a DDP run takes as many steps as one device. ``pin_memory`` and ``persistent_workers`` come from the trainer
    preset (:func:`r2m_lab.stages.devices.loader_options`).
    """

    def __init__(
        self,
        train: FrameSet,
        val: FrameSet,
        train_transform: A.Compose,
        eval_transform: A.Compose,
        batch_size: int,
        num_samples: int | None,
        balanced: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        require_both_classes(train, "training")
        require_both_classes(val, "validation")
        self.train_set = FrameDataset(train, train_transform)
        self.val_set = FrameDataset(val, eval_transform)
        self.batch_size = batch_size
        self.num_samples = num_samples or len(train)
        self.balanced = balanced
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers

    def _world(self) -> tuple[int, int]:
        """(world size, global rank) of the trainer this module is attached to ((1, 0) without one)."""
        trainer = self.trainer
        return (int(trainer.world_size), int(trainer.global_rank)) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        labels = self.train_set.frames.labels
        world, _ = self._world()  # each draw carries its own augmentation seed, so ranks never repeat one another
        if self.batch_size % world:
            raise ValueError(
                f"backbone.recipe.batch_size={self.batch_size} is the global batch and must split evenly over the "
                f"{world} processes of this trainer (trainer.devices × trainer.num_nodes)"
            )
        if self.balanced:
            sampler = balanced_sampler(labels, self.num_samples, self.seed)
        else:
            sampler = DrawSampler(None, len(labels), self.num_samples, self.seed)
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size // world,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=True,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.val_set, self.batch_size, self.num_workers, self.pin_memory, self.persistent_workers)


def eval_loader(
    dataset: FrameDataset,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )
