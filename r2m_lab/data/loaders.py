"""Transforms (albumentations) and data loaders over :class:`~r2m_lab.data.sources.FrameSet`."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from r2m_lab.data.sources import FrameSet


def build_transform(input_cfg: Mapping[str, Any], augment: Sequence[A.BasicTransform] = (), seed: int = 0) -> A.Compose:
    """Augmentations (training only), then resize to the backbone's input and normalise as the backbone expects.

    albumentations draws from its own generator, not numpy's or torch's, so ``seed`` is what makes a training run
    repeatable; DataLoader workers re-seed their copy (:func:`seed_worker_transform`).
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


def seed_worker_transform(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: give each worker's transform its own stream (torch's per-worker seed).

    Without it every worker would inherit the same albumentations state and repeat the same augmentations. Under DDP
    every rank derives the same per-worker seeds, so ``rank`` shifts them (by more than any worker count).
    """
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed((info.seed + rank * 2**16) % 2**32)


class FrameDataset(Dataset):
    """(image tensor (3, S, S), label, frame index) per frame."""

    def __init__(self, frames: FrameSet, transform: A.Compose) -> None:
        self.frames = frames
        self.transform = transform

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image = self.transform(image=self.frames.image(i))["image"]
        return image, int(self.frames.labels[i]), i


def balanced_sampler(labels: np.ndarray, num_samples: int, seed: int) -> WeightedRandomSampler:
    """Draw real and fake frames with equal probability (with replacement), whatever the class ratio of the data."""
    n_fake = int(labels.sum())
    n_real = len(labels) - n_fake
    if n_fake == 0 or n_real == 0:
        raise ValueError(f"Cannot balance classes: {n_real} real and {n_fake} fake frames")
    weights = np.where(labels == 1, 0.5 / n_fake, 0.5 / n_real)
    gen = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples, True, generator=gen)


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
        world, rank = self._world()
        if self.batch_size % world:
            raise ValueError(
                f"backbone.recipe.batch_size={self.batch_size} is the global batch and must split evenly over the "
                f"{world} processes of this trainer (trainer.devices × trainer.num_nodes)"
            )
        if world > 1 and self.num_workers == 0:  # ranks would otherwise repeat one another's augmentations
            self.train_set.transform.set_random_seed(self.seed + rank)
        if self.balanced:
            sampler = balanced_sampler(labels, self.num_samples, self.seed)
        else:
            gen = torch.Generator().manual_seed(self.seed)
            sampler = torch.utils.data.RandomSampler(self.train_set, True, self.num_samples, generator=gen)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size // world,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=True,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=functools.partial(seed_worker_transform, rank=rank) if self.num_workers > 0 else None,
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
