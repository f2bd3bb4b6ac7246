"""Frame sources: what a ``conf/data/*.yaml`` instantiates. Each gives a :class:`FrameSet` per split.

A FrameSet is the unit every stage works on: frames (in memory or on disk), 0/1 labels (fake = 1), and a video id per
frame that is unique across datasets (``dataset/label/video``), so video-level metrics never merge two videos.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import cv2
import numpy as np

SPLITS = ("train", "val", "test")


@dataclass
class FrameSet:
    """Frames of one split of one dataset. Exactly one of ``images`` (N, H, W, 3 uint8 RGB) or ``paths`` is set."""

    name: str
    labels: np.ndarray  # (N,) int64, 0 real / 1 fake
    video_ids: np.ndarray  # (N,) str
    images: np.ndarray | None = None
    paths: Sequence[str] | None = field(default=None, repr=False)
    # (N,) str identity of each frame across datasets: scoring the union of several sets scores each frame once.
    keys: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.keys is None:
            self.keys = np.asarray(self.paths) if self.paths is not None else frame_keys(self.video_ids)
        n = len(self.labels)
        if (self.images is None) == (self.paths is None):
            raise ValueError(f"FrameSet {self.name}: give exactly one of images or paths")
        if len(self.video_ids) != n or len(self.images if self.images is not None else self.paths) != n:
            raise ValueError(f"FrameSet {self.name}: labels, video ids and frames differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Frame ``i`` as an (H, W, 3) uint8 RGB array."""
        if self.images is not None:
            return self.images[i]
        path = self.paths[i]
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise OSError(f"Cannot read frame {path} (missing or corrupt) in dataset {self.name}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    @property
    def n_fake(self) -> int:
        return int(self.labels.sum())

    @property
    def n_real(self) -> int:
        return len(self) - self.n_fake

    def subset(self, index: np.ndarray, name: str | None = None) -> FrameSet:
        """The frames at ``index`` (an int array), in that order."""
        return FrameSet(
            name or self.name,
            self.labels[index],
            self.video_ids[index],
            images=self.images[index] if self.images is not None else None,
            paths=[self.paths[i] for i in index] if self.paths is not None else None,
            keys=self.keys[index],
        )

    @staticmethod
    def concat(name: str, parts: Sequence[FrameSet]) -> FrameSet:
        if not parts:
            raise ValueError(f"FrameSet {name}: nothing to concatenate")
        labels = np.concatenate([p.labels for p in parts])
        ids = np.concatenate([p.video_ids for p in parts])
        keys = np.concatenate([p.keys for p in parts])
        if all(p.images is not None for p in parts):
            return FrameSet(name, labels, ids, images=np.concatenate([p.images for p in parts]), keys=keys)
        if all(p.paths is not None for p in parts):
            return FrameSet(name, labels, ids, paths=[q for p in parts for q in p.paths], keys=keys)
        raise ValueError(f"FrameSet {name}: cannot mix in-memory and on-disk frames")


def frame_keys(video_ids: np.ndarray) -> np.ndarray:
    """``<video id>#<position within the video>`` for frames stored video by video."""
    seen: dict[str, int] = {}
    keys = []
    for vid in video_ids.tolist():
        j = seen.get(vid, 0)
        seen[vid] = j + 1
        keys.append(f"{vid}#{j}")
    return np.asarray(keys)


class SyntheticSource:
    """Families of the embedded synthetic benchmark (``r2m_lab.data.synthetic``), generated and cached on first use.

    Training data exists for domain A only (the source domain); ``val``/``test`` exist for both domains; the held-out
    (unseen) families exist only in ``test`` of domain A, with domain A's test reals as negatives.
    """

    def __init__(
        self, name: str, families: Sequence[str], domain: str, generator: Mapping[str, Any], cache_dir: str
    ) -> None:
        from r2m_lab.data import synthetic

        unknown = sorted(set(families) - set(synthetic.SEEN_FAMILIES) - set(synthetic.UNSEEN_FAMILIES))
        if unknown:
            raise ValueError(
                f"data {name}: unknown synthetic families {unknown}; valid: "
                f"{list(synthetic.SEEN_FAMILIES) + list(synthetic.UNSEEN_FAMILIES)}"
            )
        if domain not in synthetic.DOMAINS:
            raise ValueError(f"data {name}: unknown domain {domain!r}; valid: {list(synthetic.DOMAINS)}")
        self.name = name
        self.families = list(families)
        self.domain = domain
        self.generator = synthetic.SyntheticConfig(**dict(generator))
        self.cache_dir = Path(cache_dir)

    def splits(self) -> tuple[str, ...]:
        """The splits in which every family of this source has a cell (the generator's cell list decides)."""
        from r2m_lab.data import synthetic

        cells = set(synthetic.cell_keys())
        return tuple(s for s in SPLITS if all((s, self.domain, f) in cells for f in self.families))

    def frames(self, split: str) -> FrameSet:
        from r2m_lab.data import synthetic

        if split not in self.splits():
            raise ValueError(
                f"data {self.name} (families {self.families}, domain {self.domain}) has no {split!r} split; "
                f"it has {list(self.splits())}"
            )
        root = synthetic.build(self.generator, self.cache_dir)
        # Unseen families reuse the source domain's test reals, as the unseen sets of a real benchmark reuse FF reals.
        cells = [synthetic.load_cell(root, split, self.domain, "real")]
        cells += [synthetic.load_cell(root, split, self.domain, f) for f in self.families]
        return FrameSet.concat(
            f"{self.name}/{split}",
            [FrameSet(self.name, c.labels.astype(np.int64), c.video_ids, images=c.images) for c in cells],
        )


class DeepfakeBenchSource:
    """One dataset of a DeepfakeBench/DF40 JSON index (``{dataset: {label: {split: {[comp:] {video: {...}}}}}}``).

    Paths in the index are relative to ``root`` and may use Windows separators. Labels named in ``real_labels`` are
    0, those in ``fake_labels`` are 1; any other label in the index is an error (a silent drop would change the task).
    """

    def __init__(
        self,
        name: str,
        dataset: str,
        index: str,
        root: str,
        real_labels: Sequence[str],
        fake_labels: Sequence[str],
        compression: str | None = "c23",
        frames_per_video: int | None = None,
        how_to_get: str = "",
    ) -> None:
        self.name = name
        self.dataset = dataset
        self.index = Path(index)
        self.root = Path(root)
        self.real_labels = list(real_labels)
        self.fake_labels = list(fake_labels)
        self.compression = compression
        self.frames_per_video = frames_per_video
        self.how_to_get = how_to_get

    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def _load_index(self) -> Mapping[str, Any]:
        if not self.index.is_file():
            raise FileNotFoundError(
                f"Dataset index for data={self.name} not found: {self.index.absolute()}\n"
                f"Expected a DeepfakeBench JSON index ({self.dataset}.json) whose frame paths are relative to "
                f"{self.root.absolute()}. Get the data: {self.how_to_get}\n"
                "Then point paths.data_dir at the folder that holds dataset_json/ (or set data.index and data.root)."
            )
        with self.index.open() as fh:
            index = json.load(fh)
        if self.dataset not in index:
            raise ValueError(f"{self.index}: no dataset {self.dataset!r} at the top level; found {sorted(index)}")
        return index[self.dataset]

    def frames(self, split: str) -> FrameSet:
        if split not in SPLITS:
            raise ValueError(f"data {self.name}: unknown split {split!r}; valid: {list(SPLITS)}")
        labels, ids, paths = [], [], []
        for label_name, by_split in self._load_index().items():
            if label_name in self.real_labels:
                y = 0
            elif label_name in self.fake_labels:
                y = 1
            else:
                raise ValueError(
                    f"{self.index}: label {self.dataset}/{label_name} is in neither data.real_labels "
                    f"{self.real_labels} nor data.fake_labels {self.fake_labels}"
                )
            videos = by_split.get(split, {})
            if self.compression and self.compression in videos:
                videos = videos[self.compression]
            for video, record in videos.items():
                frames = list(record["frames"])
                if split == "train" and self.frames_per_video and len(frames) > self.frames_per_video:
                    # evenly spaced over the stored frames, not the first N
                    keep = np.linspace(0, len(frames) - 1, self.frames_per_video).round().astype(int)
                    frames = [frames[i] for i in keep]
                vid = f"{self.dataset}/{label_name}/{video}"
                for f in frames:
                    paths.append(str(self.root / Path(*PureWindowsPath(f).parts)))
                    labels.append(y)
                    ids.append(vid)
        if not paths:
            raise ValueError(f"{self.index}: dataset {self.dataset} has no frames in split {split!r}")
        return FrameSet(f"{self.name}/{split}", np.asarray(labels, np.int64), np.asarray(ids), paths=paths)
