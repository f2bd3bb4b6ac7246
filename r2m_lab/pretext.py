"""θ₀ for the tiny CPU backbone: a short pretext training on real images only (which photo does a crop come from).

Merging only makes sense between fine-tunes of a *pretrained* model: task vectors of a random-init backbone are
large and unrelated. The synthetic-benchmark prototype found image-ID classification trains a usable θ₀ in about a
minute on two cores, while rotation prediction stayed at chance.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from r2m_lab.data.loaders import FrameDataset, build_transform
from r2m_lab.data.sources import FrameSet
from r2m_lab.detector import Detector


def pretrain_image_id(
    backbone: nn.Module,
    images: np.ndarray,
    class_ids: np.ndarray,
    input_cfg: Mapping[str, Any],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    trainer_kwargs: Mapping[str, Any],
) -> dict[str, float]:
    """Train ``backbone`` in place with a throw-away linear head on (images (N, H, W, 3) uint8, class ids (N,)).

    The head is discarded (every specialist gets the base's own 2-logit head). Returns the last logged training
    metrics (loss and accuracy of the final batches), for the base checkpoint's card.
    """
    L.seed_everything(seed, workers=True, verbose=False)
    n_classes = int(class_ids.max()) + 1
    head = nn.Linear(backbone.num_features, n_classes)
    module = Detector(backbone, head, optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.05))
    # FrameSet's "labels" carry the class id here; nothing else reads them.
    frames = FrameSet("pretext", class_ids.astype(np.int64), np.arange(len(class_ids)).astype(str), images=images)
    dataset = FrameDataset(frames, build_transform(input_cfg, [A.HorizontalFlip(p=0.5)], seed=seed))
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=RandomSampler(dataset, True, steps * batch_size, generator=gen)
    )  # in-process (no workers): the images are already in memory
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **dict(trainer_kwargs),
    )
    trainer.fit(module, train_dataloaders=loader)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
