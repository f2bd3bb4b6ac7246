"""Raw videos → face crops + DeepfakeBench JSON indexes (what ``stage=preprocess`` runs).

Per video: ``frames_per_video`` frame indices evenly spaced over the video (``np.linspace`` over its frame count,
first and last included), the largest face of each sampled frame found by a pluggable detector
(:mod:`r2m_lab.data.faces`), a square crop of ``margin`` × the face box (or a 5-point similarity alignment where the
detector gives landmarks) resized to ``size``² and written as ``<frames dir>/<frame index>.png``. Then one index per
dataset at ``<output>/dataset_json/<dataset>.json`` (frame paths relative to ``<output>``) and a coverage report
``<dataset>.coverage.json`` beside it.

Layouts (:func:`plan`): ``ffpp`` (FaceForensics++ download tree), ``celebdf`` (Celeb-DF v1/v2 tree), ``folder`` (any
folder of videos with one label).

Policies, all recorded in each video's ``manifest.json`` and in the coverage report, never silent:

- **No face** in a sampled frame: ``no_face=skip`` (default) leaves the frame out of the index and records its index;
  ``no_face=centre`` writes the frame's central square instead and records it as a centre crop. A video with no face
  in any frame has no frames, so it is left out of the index and listed in the report.
- **Corrupt videos** (will not open, no frame decodes) and **unreadable frames** (a sampled index that does not
  decode, or lies past the real end of a stream whose header over-counts) are counted and listed with their paths;
  the run goes on. A corrupt video gets no manifest, so a re-run tries it again.
- **Resume**: a video whose ``manifest.json`` (written atomically after all its frames) carries the same settings
  fingerprint and whose frames all exist is not decoded again. A frames folder from other settings, or one this code
  did not write, is refused up front unless ``overwrite=True``. Everything is deterministic (fixed frame indices,
  detector, crops, key-sorted JSON), so a re-run gives identical bytes.
- **Existing indexes**: refused up front unless their coverage report carries this run's fingerprint (a resume of
  the same config) or ``overwrite=True``; at the end an index equal to the one built is left untouched, a different
  one is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from r2m_lab.atomic import write_bytes_atomic, write_json_atomic
from r2m_lab.data.faces import FaceDetector, centre_crop, crop_face, largest, make_face_detector
from r2m_lab.data.index import add_video, video_record, write_index

log = logging.getLogger(__name__)

# Bumped whenever a change here changes the crops: old manifests then no longer count as done.
PREPROCESS_VERSION = 1
LAYOUTS = ("ffpp", "celebdf", "folder")
NO_FACE_POLICIES = ("skip", "centre")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
MANIFEST = "manifest.json"
# Written into a frames folder before its first PNG: a folder holding it (and no manifest) is an unfinished video of
# this code, safe to redo; a folder with neither is someone else's and is never touched without overwrite.
IN_PROGRESS = ".preprocess-in-progress"

# FaceForensics++ manipulated_sequences/<folder> -> (label, dataset), as DeepfakeBench's label table spells them.
FFPP_METHODS: dict[str, tuple[str, str]] = {
    "Deepfakes": ("FF-DF", "FF-DF"),
    "Face2Face": ("FF-F2F", "FF-F2F"),
    "FaceSwap": ("FF-FS", "FF-FS"),
    "NeuralTextures": ("FF-NT", "FF-NT"),
    "FaceShifter": ("FF-FH", "FaceShifter"),
}
FFPP_REAL = "FF-real"
FFPP_ALL = "FaceForensics++"  # the joint index: the real videos and every method found
CELEBDF_FOLDERS = {"Celeb-real": "real", "YouTube-real": "real", "Celeb-synthesis": "fake"}
CELEBDF_TEST_LIST = "List_of_testing_videos.txt"
CELEBDF_LABELS = {
    "Celeb-DF-v1": ("CelebDFv1_real", "CelebDFv1_fake"),
    "Celeb-DF-v2": ("CelebDFv2_real", "CelebDFv2_fake"),
}


# --- settings and the plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropSettings:
    """Everything a video's crops depend on (its manifest's fingerprint); ``detector`` is resolved, never ``auto``."""

    frames_per_video: int = 32
    size: int = 256
    margin: float = 1.3
    detector: str = "haar"
    detector_options: Mapping[str, Any] = field(default_factory=dict)
    no_face: str = "skip"

    def __post_init__(self) -> None:
        if int(self.frames_per_video) < 1:
            raise ValueError(f"stage.frames_per_video={self.frames_per_video}; give a positive number of frames")
        if int(self.size) < 8:
            raise ValueError(f"stage.size={self.size}; crops must be at least 8 pixels")
        if not float(self.margin) >= 1.0:
            raise ValueError(f"stage.margin={self.margin}; the crop must hold the face box (margin >= 1)")
        if self.no_face not in NO_FACE_POLICIES:
            raise ValueError(f"stage.no_face={self.no_face!r}; valid: {list(NO_FACE_POLICIES)}")
        if self.detector == "auto":
            raise ValueError("CropSettings needs a resolved detector name (faces.resolve_detector_name)")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["detector_options"] = dict(self.detector_options)
        return d

    def fingerprint(self) -> str:
        return _hash({"version": PREPROCESS_VERSION, **self.as_dict()})


@dataclass(frozen=True)
class Entry:
    """Where a processed video is filed: ``dataset/label/split/[compression/]video`` of an index."""

    dataset: str
    label: str
    split: str
    video: str
    compression: str | None = None


@dataclass
class Job:
    """One video to process: its file, its frames folder (POSIX, relative to the output root), its index entries."""

    source: str
    name: str  # the video's path relative to the input folder (POSIX): how reports name it
    out_dir: str
    entries: list[Entry]


@dataclass
class Plan:
    """Every video of one input tree, and each dataset's labels (0 real / 1 fake)."""

    jobs: list[Job]
    labels: dict[str, dict[str, int]]
    notes: list[str] = field(default_factory=list)  # videos left out by the layout (e.g. in no split file), logged


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    """``{train, val, test}`` fractions: non-negative, summing to 1."""
    if set(ratios) != {"train", "val", "test"}:
        raise ValueError(f"stage.split_ratios needs exactly train, val and test, got {sorted(ratios)}")
    out = {k: float(ratios[k]) for k in ("train", "val", "test")}
    if min(out.values()) < 0 or abs(sum(out.values()) - 1.0) > 1e-6:
        raise ValueError(f"stage.split_ratios={out}: fractions must be non-negative and sum to 1")
    return out


def hash_split(key: str, ratios: Mapping[str, float]) -> str:
    """A deterministic split for ``key``: a fixed hash (SHA-256, no seed) mapped into the cumulative ratios."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    edge = 0.0
    for split in ("train", "val", "test"):
        edge += ratios[split]
        if u < edge:
            return split
    return next(s for s in ("test", "val", "train") if ratios[s] > 0)  # u at the top edge by rounding


def _videos(folder: Path, extensions: Sequence[str], recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    exts = {e.lower() for e in extensions}
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in exts)


def _require_dir(path: Path, layout: str, expected: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"stage.layout={layout}: no folder {path.absolute()}; expected {expected}")


def plan(layout: str, input_dir: str | os.PathLike[str], **options: Any) -> Plan:
    """The videos of ``input_dir`` read as ``layout`` (see :func:`plan_ffpp`, :func:`plan_celebdf`,
    :func:`plan_folder` for each one's options)."""
    builders = {"ffpp": plan_ffpp, "celebdf": plan_celebdf, "folder": plan_folder}
    if layout not in builders:
        raise ValueError(f"stage.layout={layout!r}; valid: {list(LAYOUTS)}")
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"stage.input={root.absolute()} does not exist; expected {_EXPECTED[layout]}")
    p = builders[layout](root, **options)
    if not p.jobs:
        raise FileNotFoundError(f"stage.input={root.absolute()} holds no videos; expected {_EXPECTED[layout]}")
    return p


_EXPECTED = {
    "ffpp": "a FaceForensics++ tree: original_sequences/youtube/<c23>/videos/*.mp4 and "
    "manipulated_sequences/<Method>/<c23>/videos/*.mp4",
    "celebdf": f"a Celeb-DF tree: Celeb-real/, YouTube-real/, Celeb-synthesis/ (*.mp4) and {CELEBDF_TEST_LIST}",
    "folder": f"a folder of videos ({', '.join(VIDEO_EXTENSIONS)}), all of one label",
}


def read_ffpp_splits(split_dir: str | os.PathLike[str]) -> dict[str, str]:
    """FF++'s official split files (``train.json``/``val.json``/``test.json``: lists of ``[target, source]`` id
    pairs) as ``{video id: split}``; an id in two splits is refused."""
    split_dir = Path(split_dir)
    out: dict[str, str] = {}
    for split in ("train", "val", "test"):
        path = split_dir / f"{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"stage.split_dir: no {path.absolute()} (FF++'s official {split} split file)")
        try:
            pairs = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError(f'{path}: expected a list of [target, source] id pairs, e.g. [["953", "974"], ...]')
        for pair in pairs:
            for vid in map(str, pair):
                if out.setdefault(vid, split) != split:
                    raise ValueError(f"{path}: video id {vid} is in both the {out[vid]} and the {split} split")
    return out


def plan_ffpp(
    root: Path,
    compression: str = "c23",
    methods: Sequence[str] | None = None,
    split_dir: str | None = None,
    split_ratios: Mapping[str, float] | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> Plan:
    """FaceForensics++: one index per method (``FF-DF`` …, ``FaceShifter``: real + that method) and the joint
    ``FaceForensics++`` (real + every method); the real videos are cropped once and filed in all of them.

    Splits follow the official pair files in ``split_dir`` when given; otherwise a fixed hash of each identity pair
    (``000_003`` and ``003_000`` and the real ``000`` and ``003`` share one), so no identity straddles two splits.
    """
    ratios = check_ratios(split_ratios or {"train": 0.72, "val": 0.14, "test": 0.14})
    real_dir = root / "original_sequences" / "youtube" / compression / "videos"
    _require_dir(real_dir, "ffpp", f"{_EXPECTED['ffpp']} (stage.compression={compression})")
    manip = root / "manipulated_sequences"
    found = sorted(p.name for p in manip.iterdir() if (p / compression / "videos").is_dir()) if manip.is_dir() else []
    if methods is None:
        chosen = [m for m in found if m in FFPP_METHODS]
        ignored = [m for m in found if m not in FFPP_METHODS]
        if ignored:
            log.warning(
                "stage.layout=ffpp: ignoring %s under %s (known methods: %s)", ignored, manip, list(FFPP_METHODS)
            )
    else:
        chosen = list(methods)
        for m in chosen:
            if m not in FFPP_METHODS:
                raise ValueError(f"stage.methods: unknown FF++ method {m!r}; valid: {list(FFPP_METHODS)}")
            _require_dir(manip / m / compression / "videos", "ffpp", _EXPECTED["ffpp"])
    official = read_ffpp_splits(split_dir) if split_dir else None

    fakes = {m: _videos(manip / m / compression / "videos", extensions) for m in chosen}
    partner: dict[str, str] = {}  # real id -> its pair key, from the fakes' "<target>_<source>" names
    for paths in fakes.values():
        for p in paths:
            a, _, b = p.stem.partition("_")
            if b:
                partner[a] = partner[b] = "_".join(sorted((a, b)))

    notes: list[str] = []

    def split_of(ids: Sequence[str], group: str, name: str) -> str | None:
        if official is None:
            return hash_split(group, ratios)
        splits = {official.get(i) for i in ids}
        if None in splits or len(splits) != 1:
            notes.append(f"{name}: ids {list(ids)} not in one official split ({sorted(map(str, splits))}); left out")
            return None
        return splits.pop()

    datasets = [FFPP_METHODS[m][1] for m in chosen] + [FFPP_ALL]
    labels = {ds: {FFPP_REAL: 0} for ds in datasets}
    jobs: list[Job] = []
    for p in _videos(real_dir, extensions):
        name = p.relative_to(root).as_posix()
        split = split_of([p.stem], partner.get(p.stem, p.stem), name)
        if split is not None:
            entries = [Entry(ds, FFPP_REAL, split, p.stem, compression) for ds in datasets]
            jobs.append(Job(str(p), name, _frames_dir(root, p), entries))
    for m in chosen:
        label, dataset = FFPP_METHODS[m]
        labels[dataset][label] = 1
        labels[FFPP_ALL][label] = 1
        for p in fakes[m]:
            name = p.relative_to(root).as_posix()
            ids = p.stem.split("_")
            split = split_of(ids, "_".join(sorted(ids)), name)
            if split is not None:
                entries = [Entry(ds, label, split, p.stem, compression) for ds in (dataset, FFPP_ALL)]
                jobs.append(Job(str(p), name, _frames_dir(root, p), entries))
    return Plan(jobs, labels, notes)


def _frames_dir(root: Path, video: Path, top: str = FFPP_ALL) -> str:
    """``<top>/<video's folder, its trailing 'videos' replaced by 'frames'>/<stem>`` (DeepfakeBench's layout)."""
    parts = list(video.relative_to(root).parent.parts)
    if parts and parts[-1] == "videos":
        parts = parts[:-1]
    return "/".join([top, *parts, "frames", video.stem])


def plan_celebdf(
    root: Path,
    dataset: str = "Celeb-DF-v2",
    real_label: str | None = None,
    fake_label: str | None = None,
    split_ratios: Mapping[str, float] | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> Plan:
    """Celeb-DF: ``Celeb-real`` and ``YouTube-real`` are real, ``Celeb-synthesis`` fake; the videos listed in
    ``List_of_testing_videos.txt`` (lines ``<0|1> <folder>/<file>``; only the path is used, the folder gives the
    label) are the test split, and only those (the reference JSONs also list them in train: not copied). The rest
    are split into train and val by a fixed hash in the proportion of ``split_ratios`` train : val.
    """
    ratios = check_ratios(split_ratios or {"train": 0.72, "val": 0.14, "test": 0.14})
    if real_label is None or fake_label is None:
        if dataset not in CELEBDF_LABELS:
            raise ValueError(
                f"stage.dataset={dataset!r}: give stage.real_label and stage.fake_label (known defaults for "
                f"{sorted(CELEBDF_LABELS)})"
            )
        real_label, fake_label = real_label or CELEBDF_LABELS[dataset][0], fake_label or CELEBDF_LABELS[dataset][1]
    for folder in CELEBDF_FOLDERS:
        _require_dir(root / folder, "celebdf", _EXPECTED["celebdf"])
    test_list = root / CELEBDF_TEST_LIST
    if not test_list.is_file():
        raise FileNotFoundError(f"stage.layout=celebdf: no {test_list.absolute()}; expected {_EXPECTED['celebdf']}")
    test: set[str] = set()
    for n, line in enumerate(test_list.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[0] not in ("0", "1"):
            raise ValueError(f"{test_list}:{n}: expected '<0|1> <folder>/<file>', got {line!r}")
        test.add(fields[1].replace("\\", "/"))
    trainval = ratios["train"] + ratios["val"]
    if trainval <= 0:
        raise ValueError("stage.split_ratios: Celeb-DF needs train + val > 0 for its non-test videos")
    sub = {"train": ratios["train"] / trainval, "val": ratios["val"] / trainval, "test": 0.0}
    jobs, seen = [], {}
    for folder, kind in CELEBDF_FOLDERS.items():
        label = real_label if kind == "real" else fake_label
        for p in _videos(root / folder, extensions):
            name = p.relative_to(root).as_posix()
            if (label, p.stem) in seen:
                raise ValueError(
                    f"Celeb-DF: {name} and {seen[(label, p.stem)]} would both be video {p.stem} of {label}"
                )
            seen[(label, p.stem)] = name
            split = "test" if name in test else hash_split(name, sub)
            jobs.append(Job(str(p), name, _frames_dir(root, p, dataset), [Entry(dataset, label, split, p.stem)]))
    listed = {j.name for j in jobs}
    notes = [f"{CELEBDF_TEST_LIST} lists {t}, which is not in the input" for t in sorted(test - listed)]
    return Plan(jobs, {dataset: {real_label: 0, fake_label: 1}}, notes)


def plan_folder(
    root: Path,
    dataset: str | None = None,
    label: str | None = None,
    label_value: int | None = None,
    split: str | None = None,
    split_ratios: Mapping[str, float] | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> Plan:
    """Any folder of videos (searched recursively), all labelled ``label`` (``label_value`` 0 real / 1 fake) in
    ``dataset``; every video goes to ``split``, or, when it is None, to a split by a fixed hash of its path."""
    for key, value in (("dataset", dataset), ("label", label), ("label_value", label_value)):
        if value is None:
            raise ValueError(f"stage.layout=folder needs stage.{key} (dataset name, label name, label_value 0|1)")
    if int(label_value) not in (0, 1):
        raise ValueError(f"stage.label_value={label_value}; 0 (real) or 1 (fake)")
    if split is not None and split not in ("train", "val", "test"):
        raise ValueError(f"stage.split={split!r}; train, val, test, or null for a split by hash")
    ratios = check_ratios(split_ratios or {"train": 0.72, "val": 0.14, "test": 0.14})
    jobs = []
    for p in _videos(root, extensions, recursive=True):
        name = p.relative_to(root).as_posix()
        video = p.relative_to(root).with_suffix("").as_posix().replace("/", "_")
        where = split or hash_split(name, ratios)
        jobs.append(Job(str(p), name, f"{dataset}/{label}/frames/{video}", [Entry(dataset, label, where, video)]))
    return Plan(jobs, {dataset: {label: int(label_value)}})


# --- one video -------------------------------------------------------------------------------------------------------

_DETECTOR: tuple[str, FaceDetector] | None = None  # one per process (workers build their own)


def _detector(settings: CropSettings) -> FaceDetector:
    global _DETECTOR
    key = _hash([settings.detector, dict(settings.detector_options)])
    if _DETECTOR is None or _DETECTOR[0] != key:
        _DETECTOR = (key, make_face_detector(settings.detector, dict(settings.detector_options)))
    return _DETECTOR[1]


def sample_indices(n_frames: int, n: int) -> list[int]:
    """``n`` frame indices evenly spaced over ``n_frames`` (first and last included); all of them if fewer."""
    if n_frames <= n:
        return list(range(n_frames))
    return np.linspace(0, n_frames - 1, n).round().astype(int).tolist()


def _count_frames(path: str) -> int:
    """Frames that actually decode, for containers whose header gives no count."""
    cap = cv2.VideoCapture(path)
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    return n


def folder_state(out_dir: Path, fingerprint: str) -> str:
    """``new`` (absent or empty), ``done`` (our manifest, same settings, all frames there), ``partial`` (ours,
    unfinished: safe to redo), ``other`` (another config's manifest) or ``foreign`` (not written by this code)."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return "new"
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return "other"
        if m.get("settings") != fingerprint:
            return "other"
        return "done" if all((out_dir / f).is_file() for f in m.get("files", [])) else "partial"
    return "partial" if (out_dir / IN_PROGRESS).is_file() else "foreign"


def process_video(source: str, name: str, out_root: str, out_dir: str, settings: CropSettings) -> dict[str, Any]:
    """Crop one video into ``out_root/out_dir`` and return its manifest (also written there when it decoded).

    A finished folder with this settings fingerprint is not decoded again (its manifest is returned, ``resumed``
    set). Never raises for bad data: a corrupt video comes back with ``status: corrupt`` and the reason.
    """
    fp = settings.fingerprint()
    folder = Path(out_root) / out_dir
    if folder_state(folder, fp) == "done":
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return {**manifest, "resumed": True}
    base = {"source": name, "frames_dir": out_dir, "settings": fp, "resumed": False}
    try:
        cap = cv2.VideoCapture(source)
        if not cap.isOpened():
            return {**base, "status": "corrupt", "error": "OpenCV cannot open it as a video"}
        n_frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if n_frames <= 0:
            n_frames = _count_frames(source)
        wanted = sample_indices(n_frames, int(settings.frames_per_video))
        frames: dict[int, np.ndarray] = {}
        # Sequential grab() rather than seeking: seeking in inter-coded streams lands on keyframes on some builds,
        # which would make "frame i" depend on the codec; decoding in order is exact and deterministic.
        todo = set(wanted)
        for i in range(max(wanted, default=-1) + 1):
            if not cap.grab():
                break
            if i in todo:
                ok, frame = cap.retrieve()
                if ok and frame is not None:
                    frames[i] = frame
        cap.release()
    except cv2.error as err:
        return {**base, "status": "corrupt", "error": f"OpenCV: {err}".strip()}
    if not frames:
        why = "no frame decodes" if n_frames > 0 else "no frames"
        return {**base, "status": "corrupt", "error": why, "frame_count": n_frames}
    return _crop_frames(folder, base, n_frames, wanted, frames, settings)


def _crop_frames(
    folder: Path,
    base: dict[str, Any],
    n_frames: int,
    wanted: list[int],
    frames: Mapping[int, np.ndarray],
    settings: CropSettings,
) -> dict[str, Any]:
    detector = _detector(settings)
    _clear(folder)
    (folder / IN_PROGRESS).write_bytes(b"")
    width = max(3, len(str(n_frames - 1)))
    files, no_face, centre, unreadable, boxes = [], [], [], [], {}
    aligned = 0
    for i in wanted:
        if i not in frames:
            unreadable.append(i)
            continue
        image = frames[i]  # (H, W, 3) uint8 BGR
        face = largest(detector.detect(image))
        if face is None:
            no_face.append(i)
            if settings.no_face == "skip":
                continue
            crop = centre_crop(image, settings.size)
            centre.append(i)
        else:
            crop, was_aligned = crop_face(image, face, settings.margin, settings.size)
            aligned += was_aligned
            boxes[str(i)] = [round(v, 2) for v in face.box]
        ok, png = cv2.imencode(".png", crop)
        if not ok:
            raise OSError(f"OpenCV could not encode crop {i} of {base['source']} as PNG")
        fname = f"{i:0{width}d}.png"
        write_bytes_atomic(folder / fname, png.tobytes())
        files.append(fname)
    manifest = {
        **base,
        "status": "done",
        "frame_count": n_frames,
        "sampled": wanted,
        "files": files,
        "frames": [f"{base['frames_dir']}/{f}" for f in files],
        "no_face": no_face,
        "centre_crops": centre,
        "unreadable": unreadable,
        "aligned": aligned,
        "boxes": boxes,
        "frame_size": list(next(iter(frames.values())).shape[:2]),
    }
    stored = {k: v for k, v in manifest.items() if k != "resumed"}
    write_json_atomic(folder / MANIFEST, stored)
    (folder / IN_PROGRESS).unlink(missing_ok=True)
    return manifest


def _clear(folder: Path) -> None:
    """Remove what a previous (unfinished, other-settings, or overwritten) run left in a frames folder: its PNGs and
    markers only, so stale frames never mix with new ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if p.is_file() and (p.suffix.lower() == ".png" or p.name in (MANIFEST, IN_PROGRESS)):
            p.unlink()


def _run_job(args: tuple[str, str, str, str, CropSettings]) -> dict[str, Any]:
    try:
        return process_video(*args)
    except Exception as err:  # one video's failure (a disk error, a detector crash) is reported, not fatal
        log.exception("preprocess: %s failed", args[1])
        return {"source": args[1], "frames_dir": args[3], "status": "failed", "error": f"{type(err).__name__}: {err}"}


def _init_worker() -> None:
    cv2.setNumThreads(1)  # N worker processes × OpenCV's own thread pool would oversubscribe the cores


# --- the run ---------------------------------------------------------------------------------------------------------


def index_paths(out_root: Path, dataset: str) -> tuple[Path, Path]:
    """``<out_root>/dataset_json/<dataset>.json`` and its coverage report ``<dataset>.coverage.json``."""
    folder = out_root / "dataset_json"
    return folder / f"{dataset}.json", folder / f"{dataset}.coverage.json"


def run_preprocess(
    p: Plan,
    out_root: str | os.PathLike[str],
    settings: CropSettings,
    run_config: Mapping[str, Any],
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Process every video of ``p`` into ``out_root``, write each dataset's index and coverage report.

    ``run_config`` (layout, input, split knobs: whatever decides the indexes besides ``settings``) goes into the run
    fingerprint that marks a resume. Returns ``{"datasets": {name: coverage}, "indexes": {...}, ...}``.
    """
    out_root = Path(out_root)
    fp = settings.fingerprint()
    run_fp = _hash({"settings": fp, "run": dict(run_config)})
    _check_existing(p, out_root, fp, run_fp, overwrite)
    for note in p.notes:
        log.warning("preprocess: %s", note)

    args = [(j.source, j.name, str(out_root), j.out_dir, settings) for j in p.jobs]
    results: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(args), desc="preprocess", unit="video", disable=not progress)
    if workers <= 0:
        for a in args:
            results[a[3]] = _run_job(a)
            bar.update()
    else:
        # spawn, not fork: a forked child inherits OpenCV's / torch's thread pools mid-state and can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=int(workers), mp_context=context, initializer=_init_worker) as pool:
            futures = {pool.submit(_run_job, a): a[3] for a in args}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
    bar.close()
    for r in results.values():
        if r["status"] != "done":
            log.warning("preprocess: %s video %s: %s (reported, not indexed)", r["status"], r["source"], r["error"])
        elif r["unreadable"]:
            log.warning("preprocess: %s: frames %s do not decode (reported)", r["source"], r["unreadable"])

    indexes: dict[str, dict[str, Any]] = {}
    for job in p.jobs:
        r = results[job.out_dir]
        if r["status"] != "done" or not r["frames"]:
            continue
        for e in job.entries:
            record = video_record(e.label, r["frames"])
            add_video(indexes.setdefault(e.dataset, {}), e.dataset, e.label, e.split, e.video, record, e.compression)

    summary: dict[str, Any] = {"fingerprint": run_fp, "settings": settings.as_dict(), "datasets": {}, "indexes": {}}
    for dataset, labels in p.labels.items():
        coverage = _coverage(p, results, dataset, labels, settings, run_fp, run_config)
        summary["datasets"][dataset] = coverage
        index_path, coverage_path = index_paths(out_root, dataset)
        if dataset not in indexes:
            log.error("preprocess: dataset %s has no video with a face crop: no index written", dataset)
            summary["indexes"][dataset] = None
            continue
        state = _write_unless_equal(index_path, indexes[dataset], overwrite, index=True)
        _write_unless_equal(coverage_path, coverage, overwrite or state == "written", index=False)
        summary["indexes"][dataset] = {"path": str(index_path), "coverage": str(coverage_path), "state": state}
    summary["videos"] = len(p.jobs)
    summary["resumed"] = sum(bool(r.get("resumed")) for r in results.values())
    log.info("preprocess coverage (%s):\n%s", out_root, coverage_table(summary["datasets"]))
    return summary


def _check_existing(p: Plan, out_root: Path, fp: str, run_fp: str, overwrite: bool) -> None:
    """Refuse, before any work, to touch what another config or a person prepared (unless ``overwrite``)."""
    if overwrite:
        return
    for dataset in p.labels:
        index_path, coverage_path = index_paths(out_root, dataset)
        if not index_path.exists():
            continue
        theirs = None
        if coverage_path.is_file():
            try:
                theirs = json.loads(coverage_path.read_text(encoding="utf-8")).get("fingerprint")
            except json.JSONDecodeError:
                theirs = None
        if theirs != run_fp:
            raise FileExistsError(
                f"Index {index_path.absolute()} already exists and was not written by this preprocess config "
                f"({'no coverage report beside it' if theirs is None else 'another config wrote it'}); "
                "pass stage.overwrite=true to replace it, or choose another stage.output"
            )
    clash = []
    for job in p.jobs:
        state = folder_state(out_root / job.out_dir, fp)
        if state in ("other", "foreign"):
            clash.append(f"{out_root / job.out_dir} ({'other settings' if state == 'other' else 'not written here'})")
    if clash:
        raise FileExistsError(
            f"{len(clash)} frames folders already hold other crops, e.g. {clash[:3]}; pass stage.overwrite=true to "
            "replace them, or choose another stage.output"
        )


def _write_unless_equal(path: Path, obj: Mapping[str, Any], overwrite: bool, index: bool) -> str:
    """``unchanged`` when ``path`` already holds ``obj``; else write it (existing file: only with overwrite)."""
    if path.is_file():
        try:
            if json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(obj, default=str)):
                return "unchanged"
        except json.JSONDecodeError:
            pass
        if not overwrite:
            raise FileExistsError(
                f"{path.absolute()} exists and differs from what this run built (the input changed since it was "
                "written?); pass stage.overwrite=true to replace it (finished videos are not decoded again)"
            )
    if index:
        write_index(path, obj, overwrite=overwrite)
    else:
        write_json_atomic(path, obj)
    return "written"


def _coverage(
    p: Plan,
    results: Mapping[str, Mapping[str, Any]],
    dataset: str,
    labels: Mapping[str, int],
    settings: CropSettings,
    run_fp: str,
    run_config: Mapping[str, Any],
) -> dict[str, Any]:
    """Counts per label and the named problems of one dataset; no timings or absolute paths, so a re-run writes
    the same bytes."""
    rows = {
        label: dict.fromkeys(
            ("videos", "indexed", "corrupt", "failed", "faceless_videos", "frames_sampled", "frames_read")
            + ("faces", "no_face_frames", "centre_crops", "unreadable_frames", "aligned", "frames_indexed"),
            0,
        )
        for label in labels
    }
    problems: dict[str, list[Any]] = {"corrupt": [], "failed": [], "faceless": [], "unreadable": [], "no_face": []}
    for job in p.jobs:
        mine = [e for e in job.entries if e.dataset == dataset]
        if not mine:
            continue
        r = results[job.out_dir]
        row = rows[mine[0].label]
        row["videos"] += 1
        if r["status"] in ("corrupt", "failed"):
            row[r["status"]] += 1
            problems[r["status"]].append({"video": job.name, "error": r["error"]})
            continue
        n_read = len(r["sampled"]) - len(r["unreadable"])
        row["frames_sampled"] += len(r["sampled"])
        row["frames_read"] += n_read
        row["faces"] += n_read - len(r["no_face"])
        row["no_face_frames"] += len(r["no_face"])
        row["centre_crops"] += len(r["centre_crops"])
        row["unreadable_frames"] += len(r["unreadable"])
        row["aligned"] += r["aligned"]
        row["frames_indexed"] += len(r["frames"])
        row["indexed"] += bool(r["frames"])
        if n_read and len(r["no_face"]) == n_read:
            row["faceless_videos"] += 1
            problems["faceless"].append(job.name)
        if r["unreadable"]:
            problems["unreadable"].append({"video": job.name, "frames": r["unreadable"]})
        if r["no_face"]:
            problems["no_face"].append({"video": job.name, "frames": r["no_face"]})
    return {
        "dataset": dataset,
        "fingerprint": run_fp,
        "run": dict(run_config),
        "settings": settings.as_dict(),
        "labels": dict(labels),
        "rows": rows,
        "problems": problems,
        "notes": list(p.notes),
    }


def coverage_table(datasets: Mapping[str, Mapping[str, Any]]) -> str:
    """The coverage of every dataset and label as a Markdown table (faces found / frames read)."""
    lines = [
        "| dataset | label | videos | indexed | corrupt | no face at all | frames sampled | read | faces | "
        "no face | centre crops | unreadable | face coverage |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, cov in datasets.items():
        for label, r in cov["rows"].items():
            share = f"{r['faces'] / r['frames_read']:.1%}" if r["frames_read"] else "—"
            lines.append(
                f"| {name} | {label} | {r['videos']} | {r['indexed']} | {r['corrupt'] + r['failed']} | "
                f"{r['faceless_videos']} | {r['frames_sampled']} | {r['frames_read']} | {r['faces']} | "
                f"{r['no_face_frames']} | {r['centre_crops']} | {r['unreadable_frames']} | {share} |"
            )
    return "\n".join(lines)
