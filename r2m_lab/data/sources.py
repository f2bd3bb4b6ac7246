"""Frame sources: what a ``conf/data/*.yaml`` instantiates. Each gives a :class:`FrameSet` per split.

A FrameSet is the unit every stage works on: frames (in memory or on disk), 0/1 labels (fake = 1), and a video id per
frame that is unique across datasets (``dataset/label/video``), so video-level metrics never merge two videos.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import cv2
import numpy as np

from r2m_lab.data.index import SPLITS, iter_videos, read_index  # noqa: F401 (SPLITS re-exported)

log = logging.getLogger(__name__)


UNREADABLE_POLICIES = ("error", "substitute")


@dataclass
class FrameSet:
    """Frames of one split of one dataset. Exactly one of ``images`` (N, H, W, 3 uint8 RGB) or ``paths`` is set.

    ``unreadable`` says what :meth:`image` does with a frame file that exists but cannot be decoded: ``error``
    raises with its path; ``substitute`` logs a warning with the path, records it in ``unreadable_paths`` and returns
    the nearest readable frame of the same video (same label, same content), so one corrupt PNG does not end a
    three-epoch run. A video none of whose frames can be read always raises.
    """

    name: str
    labels: np.ndarray  # (N,) int64, 0 real / 1 fake
    video_ids: np.ndarray  # (N,) str
    images: np.ndarray | None = None
    paths: Sequence[str] | None = field(default=None, repr=False)
    # (N,) str identity of each frame across datasets: scoring the union of several sets scores each frame once.
    keys: np.ndarray | None = field(default=None, repr=False)
    mask_paths: Sequence[str] | None = field(default=None, repr=False)  # (N,) manipulation masks, when asked for
    unreadable: str = "error"
    unreadable_paths: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.keys is None:
            self.keys = np.asarray(self.paths) if self.paths is not None else frame_keys(self.video_ids)
        n = len(self.labels)
        if (self.images is None) == (self.paths is None):
            raise ValueError(f"FrameSet {self.name}: give exactly one of images or paths")
        if len(self.video_ids) != n or len(self.images if self.images is not None else self.paths) != n:
            raise ValueError(f"FrameSet {self.name}: labels, video ids and frames differ in length")
        if self.mask_paths is not None and len(self.mask_paths) != n:
            raise ValueError(f"FrameSet {self.name}: {len(self.mask_paths)} masks for {n} frames")
        if self.unreadable not in UNREADABLE_POLICIES:
            raise ValueError(
                f"FrameSet {self.name}: unreadable={self.unreadable!r}; valid: {list(UNREADABLE_POLICIES)}"
            )
        self._by_video: dict[str, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Frame ``i`` as an (H, W, 3) uint8 RGB array (see the class docstring for unreadable files)."""
        if self.images is not None:
            return self.images[i]
        rgb = read_rgb(self.paths[i])
        if rgb is not None:
            return rgb
        path = self.paths[i]
        if self.unreadable == "error":
            raise OSError(
                f"Cannot read frame {path} (missing or corrupt) in dataset {self.name}. Check the file; "
                "data.unreadable_frames=substitute uses the nearest readable frame of its video instead (logged)."
            )
        if path not in self.unreadable_paths:
            self.unreadable_paths.add(path)
            log.warning("Unreadable frame %s in %s: using the nearest readable frame of its video", path, self.name)
        if self._by_video is None:
            self._by_video = {}
            for j, vid in enumerate(self.video_ids.tolist()):
                self._by_video.setdefault(vid, []).append(j)
        for j in sorted(self._by_video[str(self.video_ids[i])], key=lambda j: abs(j - i)):
            if j != i and (rgb := read_rgb(self.paths[j])) is not None:
                return rgb
            if j != i:
                self.unreadable_paths.add(self.paths[j])
        raise OSError(f"No frame of video {self.video_ids[i]} in dataset {self.name} can be read (first: {path})")

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
            mask_paths=[self.mask_paths[i] for i in index] if self.mask_paths is not None else None,
            unreadable=self.unreadable,
        )

    @staticmethod
    def concat(name: str, parts: Sequence[FrameSet]) -> FrameSet:
        """Frames of ``parts`` one after the other; the strictest ``unreadable`` policy among them applies."""
        if not parts:
            raise ValueError(f"FrameSet {name}: nothing to concatenate")
        labels = np.concatenate([p.labels for p in parts])
        ids = np.concatenate([p.video_ids for p in parts])
        keys = np.concatenate([p.keys for p in parts])
        if all(p.images is not None for p in parts):
            return FrameSet(name, labels, ids, images=np.concatenate([p.images for p in parts]), keys=keys)
        if all(p.paths is not None for p in parts):
            masks = [q for p in parts for q in p.mask_paths] if all(p.mask_paths is not None for p in parts) else None
            policy = "error" if any(p.unreadable == "error" for p in parts) else "substitute"
            paths = [q for p in parts for q in p.paths]
            return FrameSet(name, labels, ids, paths=paths, keys=keys, mask_paths=masks, unreadable=policy)
        raise ValueError(f"FrameSet {name}: cannot mix in-memory and on-disk frames")


def read_rgb(path: str) -> np.ndarray | None:
    """An image file as (H, W, 3) uint8 RGB, or None when OpenCV cannot read it (missing, truncated, not an image)."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


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


MISSING_POLICIES = ("skip", "error")

# DF40's 40 forgery methods by family, spelled as its per-method JSON indexes name them (``<method>_<domain>``,
# labels ``<method>_Real`` / ``<method>_Fake``), and the aggregate indexes per family (``FSAll_ff``, ...).
DF40_METHODS: dict[str, tuple[str, ...]] = {
    "FS": ("simswap", "faceswap", "fsgan", "inswap", "blendface", "uniface", "mobileswap", "e4s", "facedancer",
           "deepfacelab"),
    "FR": ("fomm", "facevid2vid", "wav2lip", "MRAA", "one_shot_free", "pirender", "tpsm", "lia", "danet",
           "sadtalker", "mcnet", "hyperreenact", "heygen"),
    "EFS": ("VQGAN", "StyleGAN2", "StyleGAN3", "StyleGANXL", "sd2.1", "ddim", "rddm", "pixart", "DiT", "SiT",
            "MidJourney", "whichisreal"),
    "FE": ("CollabDiff", "e4e", "stargan", "starganv2", "styleclip"),
}  # fmt: skip
DF40_AGGREGATES = tuple(f"{family}All" for family in DF40_METHODS)


def _sample(n_frames: int, n: int | None, first_n: bool) -> list[int]:
    """Positions of the frames kept from a video of ``n_frames`` when ``n`` are asked for (None: all).

    Evenly spaced over the whole video (first and last included), or the first ``n`` when ``first_n`` (the
    reference code's behaviour, which sees only the start of each clip).
    """
    if n is None or n >= n_frames:
        return list(range(n_frames))
    if first_n:
        return list(range(n))
    return np.linspace(0, n_frames - 1, n).round().astype(int).tolist()


class DeepfakeBenchSource:
    """One dataset of a DeepfakeBench/DF40 JSON index (``{dataset: {label: {split: {[comp:] {video: {...}}}}}}``).

    Paths in the index are relative to ``root`` and may use Windows or POSIX separators. Labels named in
    ``real_labels`` are 0, those in ``fake_labels`` are 1, those in ``exclude_labels`` are left out (and logged); any
    other label in the index is an error (a silent drop would change the task).

    ``compression`` picks the FF++ level (``c23``/``c40``/``raw``) where a split has levels; a split without levels
    (every non-FF++ dataset) is read as it is, and a split with levels but ``compression: null`` is refused.

    Sampling: ``frames_per_video`` frames of each training video, ``test_frames_per_video`` of each val/test video
    (None: all), evenly spaced over the stored frames; ``dfb_compat`` takes the first N instead, as the reference
    code does (only to reproduce its numbers).

    Start-up validation: every frame of the split is checked to exist (``verify_frames`` also decodes it). Under
    ``missing_frames: skip`` missing frames are dropped, a video left without frames is dropped, and both are
    logged and kept in :attr:`reports` ``[split]``; under ``error`` the split is refused, listing them. Frames that
    become unreadable later, while training, follow ``unreadable_frames`` (see :class:`FrameSet`).

    ``families`` names the forgery families a joint source covers (a joint model trains ``max_steps`` × their
    number); ``method``/``domain`` document a DF40 config and ``method`` is checked against DF40's method list.
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
        test_frames_per_video: int | None = None,
        dfb_compat: bool = False,
        with_masks: bool = False,
        missing_frames: str = "skip",
        verify_frames: bool = False,
        unreadable_frames: str = "error",
        exclude_labels: Sequence[str] = (),
        families: Sequence[str] | None = None,
        method: str | None = None,
        domain: str | None = None,
    ) -> None:
        if missing_frames not in MISSING_POLICIES:
            raise ValueError(f"data {name}: missing_frames={missing_frames!r}; valid: {list(MISSING_POLICIES)}")
        if unreadable_frames not in UNREADABLE_POLICIES:
            raise ValueError(
                f"data {name}: unreadable_frames={unreadable_frames!r}; valid: {list(UNREADABLE_POLICIES)}"
            )
        for key, n in (("frames_per_video", frames_per_video), ("test_frames_per_video", test_frames_per_video)):
            if n is not None and int(n) < 1:
                raise ValueError(f"data {name}: {key}={n}; give a positive number of frames or null for all")
        known = {m for ms in DF40_METHODS.values() for m in ms} | set(DF40_AGGREGATES)
        if method is not None and method not in known:
            raise ValueError(f"data {name}: unknown DF40 method {method!r}; valid: {sorted(known, key=str.lower)}")
        overlap = sorted(set(real_labels) & set(fake_labels) | (set(exclude_labels) & {*real_labels, *fake_labels}))
        if overlap:
            raise ValueError(f"data {name}: labels {overlap} are listed twice among real/fake/exclude labels")
        self.name = name
        self.dataset = dataset
        self.index = Path(index)
        self.root = Path(root)
        self.real_labels = list(real_labels)
        self.fake_labels = list(fake_labels)
        self.exclude_labels = list(exclude_labels)
        self.compression = compression
        self.frames_per_video = frames_per_video
        self.test_frames_per_video = test_frames_per_video
        self.dfb_compat = bool(dfb_compat)
        self.with_masks = bool(with_masks)
        self.missing_frames = missing_frames
        self.verify_frames = bool(verify_frames)
        self.unreadable_frames = unreadable_frames
        self.families = list(families) if families is not None else None
        self.method = method
        self.domain = domain
        self.how_to_get = how_to_get
        self.reports: dict[str, dict[str, Any]] = {}
        self._index: Mapping[str, Any] | None = None

    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def _load_index(self) -> Mapping[str, Any]:
        if self._index is not None:
            return self._index
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Data root for data={self.name} not found: {self.root.absolute()}\n"
                f"(its index would be {self.index.absolute()}, frame paths relative to the root)\n"
                f"Get the data: {self.how_to_get}\n"
                "Then point paths.data_dir at the folder that holds dataset_json/ (or set data.root and data.index)."
            )
        if not self.index.is_file():
            raise FileNotFoundError(
                f"Dataset index for data={self.name} not found: {self.index.absolute()}\n"
                f"Expected a DeepfakeBench JSON index ({self.dataset}.json) whose frame paths are relative to "
                f"{self.root.absolute()}. Get the data: {self.how_to_get}\n"
                "Then point paths.data_dir at the folder that holds dataset_json/ (or set data.index and data.root)."
            )
        self._index = read_index(self.index, self.dataset)
        return self._index

    def _resolve(self, rel: str) -> str:
        # PureWindowsPath splits on both separators, so Windows and POSIX relative paths land under the same root.
        return str(self.root.joinpath(*PureWindowsPath(rel).parts))

    def _label_value(self, label: str) -> int | None:
        if label in self.real_labels:
            return 0
        if label in self.fake_labels:
            return 1
        if label in self.exclude_labels:
            return None
        raise ValueError(
            f"{self.index}: label {self.dataset}/{label} is in neither data.real_labels {self.real_labels} nor "
            f"data.fake_labels {self.fake_labels} (list it in data.exclude_labels to leave it out)"
        )

    def frames(self, split: str) -> FrameSet:
        """Frames of ``split`` after validation and sampling; the validation report lands in ``reports[split]``."""
        if split not in SPLITS:
            raise ValueError(f"data {self.name}: unknown split {split!r}; valid: {list(SPLITS)}")
        labels_node = self._load_index()
        n_keep = self.frames_per_video if split == "train" else self.test_frames_per_video
        labels, ids, paths, masks = [], [], [], []
        missing: dict[str, list[str]] = {}
        dropped: list[str] = []
        excluded: set[str] = set()
        n_videos = n_listed = 0
        for label, s, comp, video, record in iter_videos(labels_node):
            if s != split:
                continue
            y = self._label_value(label)
            if y is None:
                excluded.add(label)
                continue
            self._check_compression(label, split, comp, labels_node)
            if comp is not None and comp != self.compression:
                continue
            vid = f"{self.dataset}/{label}/{video}"
            frames = [self._resolve(f) for f in record["frames"]]
            frame_masks = self._masks(vid, record, len(frames))
            n_videos += 1
            n_listed += len(frames)
            ok = [os.path.isfile(f) and (not self.verify_frames or read_rgb(f) is not None) for f in frames]
            if not all(ok):
                missing[vid] = [f for f, good in zip(frames, ok, strict=True) if not good]
                frames = [f for f, good in zip(frames, ok, strict=True) if good]
                frame_masks = [m for m, good in zip(frame_masks, ok, strict=True) if good] if frame_masks else None
            if not frames:
                dropped.append(vid)
                continue
            keep = _sample(len(frames), n_keep, self.dfb_compat)
            paths += [frames[i] for i in keep]
            masks += [frame_masks[i] for i in keep] if frame_masks else []
            labels += [y] * len(keep)
            ids += [vid] * len(keep)
        self._report(split, n_videos, n_listed, len(paths), missing, dropped, sorted(excluded))
        if not paths:
            raise ValueError(f"{self.index}: dataset {self.dataset} has no frames in split {split!r}")
        return FrameSet(
            f"{self.name}/{split}",
            np.asarray(labels, np.int64),
            np.asarray(ids),
            paths=paths,
            mask_paths=masks if self.with_masks else None,
            unreadable=self.unreadable_frames,
        )

    def _check_compression(self, label: str, split: str, comp: str | None, labels_node: Mapping[str, Any]) -> None:
        if comp is None:
            return
        levels = sorted(labels_node[label][split])
        if self.compression not in levels:
            raise ValueError(
                f"{self.index}: {self.dataset}/{label}/{split} has compression levels {levels}; "
                f"data.compression={self.compression!r} is not among them: set it to one of them"
            )

    def _masks(self, vid: str, record: Mapping[str, Any], n_frames: int) -> list[str] | None:
        if not self.with_masks:
            return None  # masks are only read when asked for: real videos have none
        masks = record.get("masks")
        if not masks or len(masks) != n_frames:
            raise ValueError(
                f"{self.index}: video {vid} has {len(masks or [])} masks for {n_frames} frames (data.with_masks=true)"
            )
        return [self._resolve(m) for m in masks]

    def _report(
        self,
        split: str,
        n_videos: int,
        n_listed: int,
        n_kept: int,
        missing: Mapping[str, list[str]],
        dropped: list[str],
        excluded: list[str],
    ) -> dict[str, Any]:
        first = [p for ps in missing.values() for p in ps][:5]
        n_missing = sum(len(ps) for ps in missing.values())
        what = "unreadable or missing" if self.verify_frames else "missing"
        report = {
            "dataset": self.dataset,
            "split": split,
            "index": str(self.index),
            "videos": n_videos,
            "frames_listed": n_listed,
            "frames_kept": n_kept,
            "missing_frames": n_missing,
            "missing_per_video": {v: len(ps) for v, ps in missing.items()},
            "first_missing": first,
            "dropped_videos": list(dropped),
            "excluded_labels": excluded,
        }
        self.reports[split] = report
        if excluded:
            log.info("data %s/%s: labels %s left out (data.exclude_labels)", self.name, split, excluded)
        if not n_missing:
            return report
        summary = (
            f"data {self.name}/{split} ({self.index}): {n_missing} of {n_listed} frames {what} in {len(missing)} of "
            f"{n_videos} videos; {len(dropped)} videos left with no frames; first: {first}"
        )
        if self.missing_frames == "error":
            raise FileNotFoundError(
                f"{summary}\nVideos: {sorted(missing)[:10]}{' ...' if len(missing) > 10 else ''}\n"
                "Fix the data, or set data.missing_frames=skip to drop them (with this report)."
            )
        log.warning("%s; skipped (data.missing_frames=skip)", summary)
        return report


class ConcatSource:
    """Several sources as one (a joint model over families that live in separate indexes, e.g. DF40's FSAll_ff,
    FRAll_ff and EFSAll_ff).

    A frame listed by several parts (the real frames they share) is kept once, under the first part's video id, so a
    joint model does not see the shared reals N times as often as each family's fakes.
    """

    def __init__(self, name: str, parts: Mapping[str, Any], families: Sequence[str] | None = None) -> None:
        if not parts:
            raise ValueError(f"data {name}: a ConcatSource needs at least one part")
        # ``families`` is what stage=finetune counts for a joint step budget; it must name the parts, no more.
        if families is not None and list(families) != list(parts):
            raise ValueError(f"data {name}: families {list(families)} must be the parts {list(parts)}")
        self.name = name
        self.parts = dict(parts)
        self.families = list(self.parts)

    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if all(s in p.splits() for p in self.parts.values()))

    def frames(self, split: str) -> FrameSet:
        joined = FrameSet.concat(f"{self.name}/{split}", [p.frames(split) for p in self.parts.values()])
        _, first = np.unique(joined.keys, return_index=True)
        return joined.subset(np.sort(first))
