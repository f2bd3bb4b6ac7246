"""Scoring several frame sets with several detectors, each distinct frame decoded once and run through each model once.

Test sets of one benchmark share frames (the same real frames serve several test sets, and the pooled validation set
may repeat some): pooling the sets and scoring each distinct frame key once saves that inference, and every set gets
its scores back in its own frame order.

An evaluation scores many models (specialists, joint, every merge) on the same frames, and a validation selection
scores every grid point on the same validation frames: the frames are decoded and transformed into input batches
once and every model is run on those tensors. The batches are held up to a memory budget (``cache_bytes``); a
benchmark whose input tensors exceed it is streamed in chunks of that size, each chunk decoded once and scored by
every model before the next is read, so memory stays bounded whatever the benchmark's size. Batch boundaries are
those of a plain loader over the distinct frames, so the scores are the same numbers as one loader pass per model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from r2m_lab.data.loaders import FrameDataset, build_transform, eval_loader
from r2m_lab.data.sources import FrameSet

CACHE_BYTES = 2 << 30  # input tensors held at once (2 GiB: ~10k CLIP frames at 224 px, ~43k tiny-ViT frames at 64 px)

# A model to score: called when its turn comes (so one model at a time need be in memory), it returns the model and
# its input config (input size, mean, std: ``r2m_lab.stages.models.model_input_config``).
ModelFactory = Callable[[], tuple[nn.Module, Mapping[str, Any]]]
Batch = tuple[torch.Tensor, np.ndarray]  # (B, 3, S, S) float32 inputs, (B,) positions among the distinct frames


class UniqueFrameScorer:
    """P(fake) of every frame of named frame sets, each distinct frame (by ``FrameSet.keys``) scored once per model.

    Built once for the sets. ``scorer(model, input_cfg)`` scores one model and returns ``{set name: (F_set,) float64
    P(fake)}`` in each set's frame order; :meth:`score_models` scores several, decoding each frame once for all of
    them. The transformed input batches are kept between calls while they fit in ``cache_bytes`` (a selection
    scores its whole grid on one decode) and rebuilt only when a model needs another input size or normalisation.
    """

    def __init__(
        self,
        sets: Mapping[str, FrameSet],
        batch_size: int,
        device: torch.device | str = "cpu",
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        if not sets:
            raise ValueError("UniqueFrameScorer needs at least one frame set")
        if batch_size < 1 or cache_bytes < 0:
            raise ValueError(
                f"UniqueFrameScorer: batch_size must be ≥ 1 and cache_bytes ≥ 0, got {batch_size}, {cache_bytes}"
            )
        self.names = list(sets)
        self.batch_size = int(batch_size)
        self.device = device
        self.cache_bytes = int(cache_bytes)
        pooled = FrameSet.concat("pooled", list(sets.values()))
        # (U,) first occurrence of each distinct frame, and (P,) where every pooled frame finds its score among the U
        _, first, inverse = np.unique(pooled.keys, return_index=True, return_inverse=True)
        self.unique = pooled.subset(first, "unique")
        self._inverse = inverse.reshape(-1)
        self._offsets = np.cumsum([0, *(len(s) for s in sets.values())])  # set i is pooled[offsets[i]:offsets[i+1]]
        self._cached: tuple[str, list[Batch]] | None = None  # (input-config key, every batch of the distinct frames)
        self.decoded = 0  # frames decoded and transformed so far (what the cache saves; tests read it)

    def __len__(self) -> int:
        """The number of distinct frames, i.e. the frames one call runs through the model."""
        return len(self.unique)

    def keys_of(self, name: str) -> np.ndarray:
        """(F_set,) the frame keys of set ``name`` in its own order (what a caller checks before reusing a scorer)."""
        i = self.names.index(name)
        return self.unique.keys[self._inverse[self._offsets[i] : self._offsets[i + 1]]]

    def __call__(
        self, model: nn.Module, input_cfg: Mapping[str, Any], desc: str | None = None
    ) -> dict[str, np.ndarray]:
        """Score the distinct frames with ``model`` (inputs as ``input_cfg`` says) and map them back to every set."""
        ((_, scores),) = self.score_models({desc or "model": lambda: (model, input_cfg)}, progress=desc is not None)
        return scores

    def score_models(
        self, models: Mapping[str, ModelFactory], progress: bool = True
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Score every model of ``models`` (label → factory); yield ``(label, {set name: (F_set,) P(fake)})``.

        When the input batches fit in the budget each model is built, scored on the cached batches and yielded in
        turn (one model in memory at a time); a single model whose frames do not fit streams them. Otherwise the
        frames are read in chunks of the budget's size and every model is built again for each chunk (its weights
        are read once per chunk, the frames once in all); the models are then yielded together after the last chunk.
        """
        if not models:
            return
        first = next(iter(models))
        built = {first: models[first]()}  # the first model, built now to learn the input size
        frame_bytes = _frame_bytes(built[first][1])
        everything = np.arange(len(self.unique))
        fits = frame_bytes * len(self.unique) <= self.cache_bytes
        if fits or len(models) == 1:
            for label, factory in models.items():
                model, input_cfg = built.pop(label) if label in built else factory()
                batches = self._batches(input_cfg) if fits else self._stream(everything, input_cfg)
                yield label, self._per_set(self._score(model, batches, label if progress else None))
                del model
            return
        chunk = max(1, self.cache_bytes // (frame_bytes * self.batch_size)) * self.batch_size  # whole batches
        self._cached = None  # the chunks use the whole budget
        flat = {label: np.empty(len(self.unique), dtype=np.float64) for label in models}
        for start in range(0, len(self.unique), chunk):
            index = everything[start : start + chunk]
            batches: tuple[str, list[Batch]] | None = None
            for label, factory in models.items():
                model, input_cfg = built.pop(label) if label in built else factory()
                key = _input_key(input_cfg)
                if batches is None or batches[0] != key:  # one input config at a time: the chunk's memory bound
                    batches = None
                    batches = (key, self._decode(index, input_cfg))
                desc = f"{label} [{start}:{index[-1] + 1}]" if progress else None
                flat[label][index] = self._score(model, batches[1], desc)[index]
                del model
        for label in models:
            yield label, self._per_set(flat[label])

    def _batches(self, input_cfg: Mapping[str, Any]) -> list[Batch]:
        """Every distinct frame's batches for ``input_cfg``, decoded on the first call and kept (they fit)."""
        key = _input_key(input_cfg)
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # another input config: free the old tensors before decoding the new ones
            self._cached = (key, self._decode(np.arange(len(self.unique)), input_cfg))
        return self._cached[1]

    def _stream(self, index: np.ndarray, input_cfg: Mapping[str, Any]) -> Iterator[Batch]:
        """The batches of frames ``index`` (in order), decoded as they are consumed and not kept."""
        frames = self.unique if len(index) == len(self.unique) else self.unique.subset(index)  # no copy of them all
        dataset = FrameDataset(frames, build_transform(input_cfg))
        for x, _, pos in eval_loader(dataset, self.batch_size):
            self.decoded += len(x)
            yield x, index[pos.numpy()]

    def _decode(self, index: np.ndarray, input_cfg: Mapping[str, Any]) -> list[Batch]:
        return list(self._stream(index, input_cfg))

    @torch.inference_mode()
    def _score(self, model: nn.Module, batches: Any, desc: str | None) -> np.ndarray:
        """(U,) float64 P(fake): the arithmetic of :func:`r2m_lab.detector.score_frames`, on prepared batches;
        positions not in ``batches`` are left unset (a chunk)."""
        model.eval().to(self.device)
        out = np.empty(len(self.unique), dtype=np.float64)
        for x, pos in tqdm(batches, desc=desc, leave=False, disable=desc is None):
            prob = model(x.to(self.device, non_blocking=True)).float().softmax(1)[:, 1]
            out[pos] = prob.cpu().numpy()
        return out

    def _per_set(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        pooled = flat[self._inverse]  # (P,)
        return {name: pooled[self._offsets[i] : self._offsets[i + 1]] for i, name in enumerate(self.names)}


def _frame_bytes(input_cfg: Mapping[str, Any]) -> int:
    """Bytes of one frame's input tensor: (3, S, S) float32 after resizing to ``input_size`` S."""
    size = int(input_cfg["input_size"])
    return 3 * size * size * 4


def _input_key(input_cfg: Mapping[str, Any]) -> str:
    return json.dumps(dict(input_cfg), sort_keys=True, default=list)
