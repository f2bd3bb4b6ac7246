"""Frame sources: what a ``conf/data/*.yaml`` instantiates. Each gives a :class:`FrameSet` per split.

A FrameSet is the unit every stage works on: frames (in memory or on disk), 0/1 labels (fake = 1), and a video id per
frame that is unique across datasets (``dataset/label/video``), so video-level metrics never merge two videos.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import cv2
import numpy as np

from r2m_lab.data.index import (  # noqa: F401 (SPLITS re-exported)
    SPLITS,
    FramePathResolver,
    IndexSchemaError,
    iter_videos,
    load_index_json,
    validate_index,
)

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
    # (N,) manipulation mask per frame when asked for; None for a frame whose video has none (real videos)
    mask_paths: Sequence[str | None] | None = field(default=None, repr=False)
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

    def check_available(self) -> None:
        """Nothing to check: the embedded benchmark is generated on first use."""

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
VAL_SOURCES = ("auto", "index", "train")
# dfb_compat: which reference loader's frame choice to reproduce (see DeepfakeBenchSource).
DFB_COMPAT = {False: None, True: "deepfakebench", "deepfakebench": "deepfakebench", "df40": "df40"}

# DF40's 40 forgery methods by family, spelled as its per-method JSON indexes name them (``<method>_<domain>``,
# labels ``<method>_Real`` / ``<method>_Fake``), and the aggregate indexes per family (``FSAll_ff``, ...). DF40's
# label table has FSAll, FRAll and EFSAll but no FEAll: its five face-editing sets are separate indexes named as its
# unseen-set protocol reads them (``e4e``, ``CollabDiff``, ...), see conf/data/df40_fe_ff.yaml.
DF40_METHODS: dict[str, tuple[str, ...]] = {
    "FS": ("simswap", "faceswap", "fsgan", "inswap", "blendface", "uniface", "mobileswap", "e4s", "facedancer",
           "deepfacelab"),
    "FR": ("fomm", "facevid2vid", "wav2lip", "MRAA", "one_shot_free", "pirender", "tpsm", "lia", "danet",
           "sadtalker", "mcnet", "hyperreenact", "heygen"),
    "EFS": ("VQGAN", "StyleGAN2", "StyleGAN3", "StyleGANXL", "sd2.1", "ddim", "rddm", "pixart", "DiT", "SiT",
            "MidJourney", "whichisreal"),
    "FE": ("CollabDiff", "e4e", "stargan", "starganv2", "styleclip"),
}  # fmt: skip
DF40_AGGREGATES = ("FSAll", "FRAll", "EFSAll")


def time_order(paths: Sequence[str]) -> list[int]:
    """Positions of ``paths`` in time order: by the integer file stem (``000.png``, ``109.png``, ``1234.png``) when
    every stem is an integer, else in listed order (DF40's image sets: ``seed0188.png``; nothing to order by).

    DeepfakeBench's ``rearrange.py`` lists frames in directory order, which is not time order.
    """
    stems = [PureWindowsPath(p).stem for p in paths]  # PureWindowsPath: both separators
    if not all(s.isdigit() for s in stems):
        return list(range(len(paths)))
    return sorted(range(len(paths)), key=lambda i: int(stems[i]))


def _sample(n_frames: int, n: int | None, first_n: bool) -> list[int]:
    """Positions (in time order) of the frames kept from a video of ``n_frames`` when ``n`` are asked for (None: all).

    Evenly spaced over the whole video (first and last included), or the first ``n`` when ``first_n``: what the
    reference loaders end up doing (DeepfakeBench sets its total to N before computing the step, so the step is 1).
    """
    if n is None or n >= n_frames:
        return list(range(n_frames))
    if first_n:
        return list(range(n))
    return np.linspace(0, n_frames - 1, n).round().astype(int).tolist()


def _holdout_rank(video: str) -> float:
    """A fixed pseudo-random number in [0, 1) per video name (the same on every machine and in every run)."""
    return int(hashlib.sha256(video.encode("utf-8")).hexdigest()[:15], 16) / 16**15


class DeepfakeBenchSource:
    """One dataset of a DeepfakeBench/DF40 JSON index (``{dataset: {label: {split: {[comp:] {video: {...}}}}}}``).

    **Index file**: ``index`` when given, else ``<index_dir>/<dataset>.json``, else the first of
    ``<index_dir>/<alias>.json`` for ``dataset_aliases`` that exists (logged; for names DF40 itself spells two ways,
    e.g. ``e4e`` in its protocol, ``e4e_ff`` in its ``rearrange.py``); the top-level key is the file's name.

    **Frame paths** may be relative to ``root`` (Windows or POSIX separators), absolute, or Windows drive-letter paths;
    see :class:`~r2m_lab.data.index.FramePathResolver` for how they map to files.

    **Labels** named in ``real_labels`` are 0, those in ``fake_labels`` 1, those in ``exclude_labels`` are left out
    (and logged); any other label in the index is an error (a silent drop would change the task). A listed label the
    index does not have is fine (aliases of a label name, e.g. DF40's ``CollabDiff_Fake`` and
    ``Collaborative_Diffusion_Fake``).

    ``compression`` picks the FF++ level (``c23``/``c40``/``raw``) where a split has levels; a split without levels
    (every non-FF++ dataset) is read as it is, and a split with levels but ``compression: null`` is refused.

    **Validation of the index** covers what a split reads; a malformed node elsewhere (DeepfakeBench's ``DFDC.json``
    has a video record as its ``val`` node) is logged with its key path and listed in the report, not fatal.

    **Validation split** (``val_source``): ``index`` reads the index's ``val``; ``train`` holds out about
    ``val_fraction`` of the training videos of each label (by a fixed hash of the video name, see
    :meth:`heldout_videos`) as ``val`` and trains on the rest;
    ``auto`` (default) reads the index's ``val`` when it lists any video of the labels read, else holds out.

    **Frame order and sampling**: each video's frames are put in time order (by integer file stem; listed order when
    the stems are not all integers), then ``frames_per_video`` of each training video and ``test_frames_per_video`` of
    each val/test video (None: all) are taken evenly spaced, first and last included. ``dfb_compat`` reproduces a
    reference loader's choice instead: ``true`` (or ``deepfakebench``) = DeepfakeBench's (integer-stem order, then
    the first N), ``df40`` = DF40's fork (listed order, then the first N). Only to reproduce their numbers.

    **Masks** (``with_masks``): each frame gets the mask of the same file name that its video lists, or None (real
    videos, FaceShifter and some DFD fakes have none); a split in which no frame has a mask is refused.

    **Start-up check**: every frame of the split is checked to exist (``verify_frames`` also decodes it). Under
    ``missing_frames: skip`` missing frames are dropped, a video left without frames is dropped, and both are logged
    and kept in :attr:`reports` ``[split]``; under ``error`` the split is refused, listing them. Frames that become
    unreadable later, while training, follow ``unreadable_frames`` (see :class:`FrameSet`).

    ``families`` names the forgery families a joint source covers (a joint model trains ``max_steps`` × their
    number); ``method``/``domain`` document a DF40 config and ``method`` is checked against DF40's method list.
    """

    def __init__(
        self,
        name: str,
        dataset: str,
        index: str | None,
        root: str,
        real_labels: Sequence[str],
        fake_labels: Sequence[str],
        compression: str | None = "c23",
        frames_per_video: int | None = None,
        how_to_get: str = "",
        test_frames_per_video: int | None = None,
        dfb_compat: bool | str = False,
        with_masks: bool = False,
        missing_frames: str = "skip",
        verify_frames: bool = False,
        unreadable_frames: str = "error",
        exclude_labels: Sequence[str] = (),
        families: Sequence[str] | None = None,
        method: str | None = None,
        domain: str | None = None,
        index_dir: str | None = None,
        dataset_aliases: Sequence[str] = (),
        val_source: str = "auto",
        val_fraction: float = 0.1,
    ) -> None:
        if missing_frames not in MISSING_POLICIES:
            raise ValueError(f"data {name}: missing_frames={missing_frames!r}; valid: {list(MISSING_POLICIES)}")
        if unreadable_frames not in UNREADABLE_POLICIES:
            raise ValueError(
                f"data {name}: unreadable_frames={unreadable_frames!r}; valid: {list(UNREADABLE_POLICIES)}"
            )
        if val_source not in VAL_SOURCES:
            raise ValueError(f"data {name}: val_source={val_source!r}; valid: {list(VAL_SOURCES)}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"data {name}: val_fraction={val_fraction}; give a fraction of training videos in (0, 1)")
        if not isinstance(dfb_compat, bool | str) or dfb_compat not in DFB_COMPAT:
            raise ValueError(f"data {name}: dfb_compat={dfb_compat!r}; valid: false, true, deepfakebench, df40")
        for key, n in (("frames_per_video", frames_per_video), ("test_frames_per_video", test_frames_per_video)):
            if n is not None and int(n) < 1:
                raise ValueError(f"data {name}: {key}={n}; give a positive number of frames or null for all")
        known = {m for ms in DF40_METHODS.values() for m in ms} | set(DF40_AGGREGATES)
        if method is not None and method not in known:
            raise ValueError(f"data {name}: unknown DF40 method {method!r}; valid: {sorted(known, key=str.lower)}")
        overlap = sorted(set(real_labels) & set(fake_labels) | (set(exclude_labels) & {*real_labels, *fake_labels}))
        if overlap:
            raise ValueError(f"data {name}: labels {overlap} are listed twice among real/fake/exclude labels")
        if index is None and index_dir is None:
            raise ValueError(f"data {name}: give data.index_dir (the folder of the JSON indexes) or data.index")
        self.name = name
        self.dataset = dataset
        self.dataset_aliases = list(dataset_aliases)
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.index = Path(index) if index is not None else self.index_dir / f"{dataset}.json"
        self._explicit_index = index is not None
        self.root = Path(root)
        self.real_labels = list(real_labels)
        self.fake_labels = list(fake_labels)
        self.exclude_labels = list(exclude_labels)
        self.compression = compression
        self.frames_per_video = frames_per_video
        self.test_frames_per_video = test_frames_per_video
        self.dfb_compat = DFB_COMPAT[dfb_compat]
        self.with_masks = bool(with_masks)
        self.missing_frames = missing_frames
        self.verify_frames = bool(verify_frames)
        self.unreadable_frames = unreadable_frames
        self.val_source = val_source
        self.val_fraction = float(val_fraction)
        self.families = list(families) if families is not None else None
        self.method = method
        self.domain = domain
        self.how_to_get = how_to_get
        self.reports: dict[str, dict[str, Any]] = {}
        self.index_problems: list[str] = []  # malformed nodes outside what was read, by key path
        self._raw: Any = None
        self._valid: set[str] = set()
        self._holdout: set[str] | None = None
        self._holdout_on: bool | None = None
        self._resolver = FramePathResolver(self.root)

    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def check_available(self) -> None:
        """Raise FileNotFoundError (naming the root, the index paths tried and where to get the data) unless the
        index can be found: what a run checks before it spends time on anything else."""
        self._find_index()

    # --- the index file ----------------------------------------------------------------------------------------

    def _find_index(self) -> Path:
        candidates = [self.index]
        if not self._explicit_index:
            candidates += [self.index_dir / f"{alias}.json" for alias in self.dataset_aliases]
        for i, path in enumerate(candidates):
            if path.is_file():
                if i:
                    log.warning(
                        "data %s: no %s; reading %s instead (an alias of %s: the same set named another way)",
                        self.name,
                        self.index.name,
                        path,
                        self.dataset,
                    )
                return path
        tried = ", ".join(str(p.absolute()) for p in candidates)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Data root for data={self.name} not found: {self.root.absolute()}\n"
                f"(its index would be {tried}; frame paths relative to the root)\n"
                f"Get the data: {self.how_to_get}\n"
                "Then point paths.data_dir at the data root (and paths.index_dir at the folder of the JSON indexes if "
                "it is not <data_dir>/dataset_json, e.g. DeepfakeBench's preprocessing/dataset_json)."
            )
        raise FileNotFoundError(
            f"Dataset index for data={self.name} not found: {tried}\n"
            f"Expected a DeepfakeBench JSON index ({self.dataset}.json) whose relative frame paths are under "
            f"{self.root.absolute()}. Get the data: {self.how_to_get}\n"
            "Then set paths.index_dir to the folder that holds the JSON indexes (DeepfakeBench keeps them in "
            "preprocessing/dataset_json) and paths.data_dir to the data root, or data.index to the file."
        )

    def _labels(self, splits: Sequence[str]) -> Mapping[str, Any]:
        """The dataset's ``{label: ...}`` mapping with ``splits`` validated (their problems raise; others reported)."""
        if self._raw is None:
            path = self._find_index()
            raw = load_index_json(path)
            # The top-level key is the dataset's name; an alias file is named after (and keyed by) the alias.
            dataset = self.dataset if path == self.index else path.stem
            if isinstance(raw, Mapping) and raw and dataset not in raw:
                raise KeyError(f"{path}: no dataset {dataset!r} at the top level; found {sorted(raw)}")
            self.index, self.dataset, self._raw = path, dataset, raw
        todo = [s for s in splits if s not in self._valid]
        if todo:
            for problem in validate_index(self._raw, source=self.index, splits=todo, dataset=self.dataset):
                if str(problem) not in self.index_problems:
                    self.index_problems.append(str(problem))
                    log.warning("data %s: index problem outside the splits read (not used): %s", self.name, problem)
            self._valid.update(todo)
        return self._raw[self.dataset]

    # --- labels, validation split ------------------------------------------------------------------------------

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

    def _videos(self, split: str) -> Iterator[tuple[str, int, str, Mapping[str, Any]]]:
        """(label, 0/1, video id, record) of the videos of ``split`` at the chosen compression, labels read only."""
        labels_node = self._labels([split])
        for label, _, comp, video, record in iter_videos(labels_node, [split]):
            y = self._label_value(label)
            if y is None:
                continue
            self._check_compression(label, split, comp, labels_node)
            if comp is not None and comp != self.compression:
                continue
            yield label, y, f"{self.dataset}/{label}/{video}", record

    def holdout_active(self) -> bool:
        """Whether ``val`` is held out of ``train`` (``val_source``: train, or auto and the index has no val videos)."""
        if self.val_source != "auto":
            return self.val_source == "train"
        if self._holdout_on is not None:
            return self._holdout_on
        try:
            has_val = any(True for _ in self._videos("val"))
        except IndexSchemaError as err:
            raise IndexSchemaError(
                f"{err}\n(data {self.name}: data.val_source=train holds out part of train as val instead)"
            ) from err
        if not has_val:
            log.warning(
                "data %s: %s lists no val video for the labels read; holding out %.0f%% of each label's training "
                "videos (by video id) as val (data.val_source=auto)",
                self.name,
                self.index,
                100 * self.val_fraction,
            )
        self._holdout_on = not has_val
        return self._holdout_on

    def heldout_videos(self) -> set[str]:
        """Video ids of ``train`` held out as ``val``: those whose video name hashes below ``val_fraction``.

        A rule on the name alone (not a draw, not a rank within this index) holds out the same videos in every run,
        at every compression and in every index that lists them, so indexes that share real videos (DF40's) keep
        them on one side in a joint model. A label with two or more training videos none of which falls below
        keeps its lowest one out, so that val has both classes.
        """
        if self._holdout is None:
            by_label: dict[str, set[str]] = {}
            for label, _, vid, _ in self._videos("train"):
                by_label.setdefault(label, set()).add(vid)
            held: set[str] = set()
            for vids in by_label.values():
                rank = {v: _holdout_rank(v.split("/", 2)[2]) for v in vids}  # vid = dataset/label/video
                chosen = {v for v in vids if rank[v] < self.val_fraction}
                if not chosen and len(vids) >= 2:
                    chosen = {min(vids, key=rank.__getitem__)}
                held |= chosen
            self._holdout = held
        return self._holdout

    # --- frames ------------------------------------------------------------------------------------------------

    def frames(self, split: str) -> FrameSet:
        """Frames of ``split`` after validation and sampling; the validation report lands in ``reports[split]``."""
        if split not in SPLITS:
            raise ValueError(f"data {self.name}: unknown split {split!r}; valid: {list(SPLITS)}")
        read, keep_video = split, None
        holdout = split in ("train", "val") and self.holdout_active()
        if holdout:
            held = self.heldout_videos()
            read = "train"
            keep_video = (lambda v: v in held) if split == "val" else (lambda v: v not in held)  # noqa: E731
        n_keep = self.frames_per_video if split == "train" else self.test_frames_per_video
        labels, ids, paths, masks = [], [], [], []
        missing: dict[str, list[str]] = {}
        dropped: list[str] = []
        excluded = sorted({lab for lab in self._labels([read]) if lab in self.exclude_labels})
        n_videos = n_listed = n_listed_order = 0
        for _, y, vid, record in self._videos(read):
            if keep_video is not None and not keep_video(vid):
                continue
            listed = record["frames"]
            order = time_order(listed) if self.dfb_compat != "df40" else list(range(len(listed)))
            n_listed_order += len(listed) > 1 and not all(PureWindowsPath(f).stem.isdigit() for f in listed)
            located = [self._resolver.locate(listed[i]) for i in order]
            frame_masks = self._masks(record, [listed[i] for i in order])
            n_videos += 1
            n_listed += len(listed)
            ok = [found and (not self.verify_frames or read_rgb(f) is not None) for f, found in located]
            frames = [f for f, _ in located]
            if not all(ok):
                missing[vid] = [f for f, good in zip(frames, ok, strict=True) if not good]
                frames = [f for f, good in zip(frames, ok, strict=True) if good]
                frame_masks = [m for m, good in zip(frame_masks, ok, strict=True) if good]
            if not frames:
                dropped.append(vid)
                continue
            keep = _sample(len(frames), n_keep, self.dfb_compat is not None)
            paths += [frames[i] for i in keep]
            masks += [frame_masks[i] for i in keep]
            labels += [y] * len(keep)
            ids += [vid] * len(keep)
        report = self._report(split, n_videos, n_listed, len(paths), missing, dropped, excluded)
        report["val_from"] = ("train hold-out" if holdout else "index") if split == "val" else None
        report["listed_order_videos"] = int(n_listed_order)
        if not paths:
            self._refuse_empty(split, read, n_listed, missing)
        if self.with_masks and all(m is None for m in masks):
            raise ValueError(
                f"{self.index}: data.with_masks=true but no frame of {self.dataset}/{split} has a mask (real videos "
                'never do; FF++ fakes list theirs under "masks")'
            )
        report["frames_without_mask"] = sum(m is None for m in masks) if self.with_masks else None
        return FrameSet(
            f"{self.name}/{split}",
            np.asarray(labels, np.int64),
            np.asarray(ids),
            paths=paths,
            mask_paths=masks if self.with_masks else None,
            unreadable=self.unreadable_frames,
        )

    def _refuse_empty(self, split: str, read: str, n_listed: int, missing: Mapping[str, list[str]]) -> None:
        where = f"split {split!r}" + (f" (held out of {read!r})" if read != split else "")
        if not n_listed:
            raise ValueError(f"{self.index}: dataset {self.dataset} has no frames in {where}")
        first = next(p for ps in missing.values() for p in ps)
        raise FileNotFoundError(
            f"data {self.name}: none of the {n_listed} frames listed in {self.index} for {where} exists; first: "
            f"{first}\nRelative paths are read under data.root={self.root.absolute()}; absolute ones as given, else "
            "with leading folders dropped until the rest exists under data.root. Point paths.data_dir (or data.root) "
            "at the folder that holds the dataset folders the paths name (e.g. FaceForensics++/, DF40/)."
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

    def _masks(self, record: Mapping[str, Any], frames: Sequence[str]) -> list[str | None]:
        """Per frame (time order), the listed mask of the same file name, or None (when not asked: all None)."""
        if not self.with_masks:
            return [None] * len(frames)
        # DeepfakeBench lists masks in directory order too, and a video may have none: pair them by file name.
        by_name = {PureWindowsPath(m).name: m for m in record.get("masks") or []}
        out: list[str | None] = []
        for f in frames:
            m = by_name.get(PureWindowsPath(f).name)
            out.append(None if m is None else self._resolver.locate(m)[0])
        return out

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
            "index_problems": list(self.index_problems),
        }
        self.reports[split] = report
        if excluded:
            log.info("data %s/%s: labels %s left out (data.exclude_labels)", self.name, split, excluded)
        if not n_missing or n_kept == 0:
            return report  # nothing kept: _refuse_empty explains
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

    def check_available(self) -> None:
        for part in self.parts.values():
            part.check_available()

    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if all(s in p.splits() for p in self.parts.values()))

    def frames(self, split: str) -> FrameSet:
        joined = FrameSet.concat(f"{self.name}/{split}", [p.frames(split) for p in self.parts.values()])
        _, first = np.unique(joined.keys, return_index=True)
        return joined.subset(np.sort(first))
