"""``layout=ffpp``: a FaceForensics++ download tree → one index per method and the joint ``FaceForensics++``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from r2m_lab.data.preprocess.plan import Entry, Job, Plan, frames_dir, hash_split, list_videos, require_dir

log = logging.getLogger(__name__)

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


def read_ffpp_splits(split_dir: str | os.PathLike[str]) -> dict[str, str]:
    """FF++'s official split files (``train.json``/``val.json``/``test.json``: lists of ``[target, source]`` id
    pairs) as ``{video id: split}``; an id in two splits is refused."""
    split_dir = Path(split_dir)
    out: dict[str, str] = {}
    for split in ("train", "val", "test"):
        path = split_dir / f"{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"layout.split_dir: no {path.absolute()} (FF++'s official {split} split file)")
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


class FFPPLayout:
    """FaceForensics++: one index per method (``FF-DF`` …, ``FaceShifter``: real + that method) and the joint
    ``FaceForensics++`` (real + every method); the real videos are cropped once and filed in all of them.

    ``compression`` is the level whose videos are read (and the index's level key); ``methods`` the manipulation
    folders (None: every known one found, unknown ones logged). Splits follow the official pair files in
    ``split_dir`` when given; otherwise a fixed hash of each identity pair (``000_003`` and ``003_000`` and the real
    ``000`` and ``003`` share one), so no identity straddles two splits.
    """

    name = "ffpp"
    expected = (
        "a FaceForensics++ tree: original_sequences/youtube/<c23>/videos/*.mp4 and "
        "manipulated_sequences/<Method>/<c23>/videos/*.mp4"
    )

    def __init__(self, compression: str = "c23", methods: Sequence[str] | None = None, split_dir: str | None = None):
        if methods is not None:
            unknown = [m for m in methods if m not in FFPP_METHODS]
            if unknown:
                raise ValueError(f"layout.methods: unknown FF++ method {unknown[0]!r}; valid: {list(FFPP_METHODS)}")
        self.compression = str(compression)
        self.methods = list(methods) if methods is not None else None
        self.split_dir = split_dir

    def options(self) -> dict[str, Any]:
        return {"compression": self.compression, "methods": self.methods, "split_dir": self.split_dir}

    def plan(self, root: Path, split_ratios: Mapping[str, float], extensions: Sequence[str]) -> Plan:
        compression = self.compression
        real_dir = root / "original_sequences" / "youtube" / compression / "videos"
        require_dir(real_dir, self.name, f"{self.expected} (layout.compression={compression})")
        manip = root / "manipulated_sequences"
        found = (
            sorted(p.name for p in manip.iterdir() if (p / compression / "videos").is_dir()) if manip.is_dir() else []
        )
        if self.methods is None:
            chosen = [m for m in found if m in FFPP_METHODS]
            ignored = [m for m in found if m not in FFPP_METHODS]
            if ignored:
                log.warning("layout=ffpp: ignoring %s under %s (known methods: %s)", ignored, manip, list(FFPP_METHODS))
        else:
            chosen = list(self.methods)
            for m in chosen:
                require_dir(manip / m / compression / "videos", self.name, self.expected)
        official = read_ffpp_splits(self.split_dir) if self.split_dir else None

        fakes = {m: list_videos(manip / m / compression / "videos", extensions) for m in chosen}
        partner: dict[str, str] = {}  # real id -> its pair key, from the fakes' "<target>_<source>" names
        for paths in fakes.values():
            for p in paths:
                a, _, b = p.stem.partition("_")
                if b:
                    partner[a] = partner[b] = "_".join(sorted((a, b)))

        notes: list[str] = []

        def split_of(ids: Sequence[str], group: str, name: str) -> str | None:
            if official is None:
                return hash_split(group, split_ratios)
            splits = {official.get(i) for i in ids}
            if None in splits or len(splits) != 1:
                notes.append(
                    f"{name}: ids {list(ids)} not in one official split ({sorted(map(str, splits))}); left out"
                )
                return None
            return splits.pop()

        datasets = [FFPP_METHODS[m][1] for m in chosen] + [FFPP_ALL]
        labels = {ds: {FFPP_REAL: 0} for ds in datasets}
        jobs: list[Job] = []
        for p in list_videos(real_dir, extensions):
            name = p.relative_to(root).as_posix()
            split = split_of([p.stem], partner.get(p.stem, p.stem), name)
            if split is not None:
                entries = [Entry(ds, FFPP_REAL, split, p.stem, compression) for ds in datasets]
                jobs.append(Job(str(p), name, frames_dir(root, p, FFPP_ALL), entries))
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
                    jobs.append(Job(str(p), name, frames_dir(root, p, FFPP_ALL), entries))
        return Plan(jobs, labels, notes)
