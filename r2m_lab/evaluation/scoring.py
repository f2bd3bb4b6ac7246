"""Scoring several frame sets with a detector, each distinct frame run through the model once.

Test sets of one benchmark share frames (the same real frames serve several test sets, and the pooled validation set
may repeat some): pooling the sets and scoring each distinct frame key once saves that inference, and every set gets
its scores back in its own frame order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from r2m_lab.data.loaders import FrameDataset, build_transform, eval_loader
from r2m_lab.data.sources import FrameSet
from r2m_lab.detector import score_frames


class UniqueFrameScorer:
    """P(fake) of every frame of named frame sets, each distinct frame (by ``FrameSet.keys``) scored once per model.

    Built once for the sets, then called once per model: ``scorer(model, input_cfg)`` returns
    ``{set name: (F_set,) float64 P(fake)}`` in each set's frame order. The loader over the distinct frames is kept
    between calls and rebuilt only when a model needs another input size or normalisation (``input_cfg``).
    """

    def __init__(self, sets: Mapping[str, FrameSet], batch_size: int, device: torch.device | str = "cpu") -> None:
        if not sets:
            raise ValueError("UniqueFrameScorer needs at least one frame set")
        self.names = list(sets)
        self.batch_size = int(batch_size)
        self.device = device
        pooled = FrameSet.concat("pooled", list(sets.values()))
        # (U,) first occurrence of each distinct frame, and (P,) where every pooled frame finds its score among the U
        _, first, inverse = np.unique(pooled.keys, return_index=True, return_inverse=True)
        self.unique = pooled.subset(first, "unique")
        self._inverse = inverse.reshape(-1)
        self._offsets = np.cumsum([0, *(len(s) for s in sets.values())])  # set i is pooled[offsets[i]:offsets[i+1]]
        self._loader: DataLoader | None = None
        self._loader_key: str | None = None

    def __len__(self) -> int:
        """The number of distinct frames, i.e. the frames one call runs through the model."""
        return len(self.unique)

    def _loader_for(self, input_cfg: Mapping[str, Any]) -> DataLoader:
        key = json.dumps(dict(input_cfg), sort_keys=True, default=list)
        if self._loader is None or key != self._loader_key:
            dataset = FrameDataset(self.unique, build_transform(input_cfg))
            self._loader, self._loader_key = eval_loader(dataset, self.batch_size), key
        return self._loader

    def __call__(
        self, model: nn.Module, input_cfg: Mapping[str, Any], desc: str | None = None
    ) -> dict[str, np.ndarray]:
        """Score the distinct frames with ``model`` (inputs as ``input_cfg`` says) and map them back to every set."""
        flat = score_frames(model, self._loader_for(input_cfg), self.device, desc=desc)[self._inverse]  # (P,)
        return {name: flat[self._offsets[i] : self._offsets[i + 1]] for i, name in enumerate(self.names)}
