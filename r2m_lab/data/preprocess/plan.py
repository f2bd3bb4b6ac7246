"""The plan of a preprocessing run: which videos to crop, where their frames go, which index entries they fill.

A *layout* (one entry of ``conf/layout/``, instantiated from its ``_target_``) reads an input tree into a
:class:`Plan`; this module holds what every layout shares: the plan's records, the :class:`Layout` contract, the
fixed-hash split and the video listing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
DEFAULT_RATIOS = {"train": 0.72, "val": 0.14, "test": 0.14}


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


@runtime_checkable
class Layout(Protocol):
    """A planner for one kind of input tree, built from its ``conf/layout/<name>.yaml`` knobs."""

    name: ClassVar[str]  # how reports and error messages name the layout (layout=<name>)
    expected: ClassVar[str]  # what the input tree must look like, for error messages

    def options(self) -> dict[str, Any]:
        """The layout's knobs as they decide the indexes (they go into the run fingerprint and coverage report)."""
        ...

    def plan(self, root: Path, split_ratios: Mapping[str, float], extensions: Sequence[str]) -> Plan:
        """The videos under ``root`` (an existing folder), filed into datasets, labels and splits."""
        ...


def plan(
    layout: Layout,
    input_dir: str | os.PathLike[str],
    split_ratios: Mapping[str, float] | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> Plan:
    """The videos of ``input_dir`` read by ``layout``; a missing or videoless input is refused naming the layout."""
    if not isinstance(layout, Layout):
        raise TypeError(f"layout: {type(layout).__name__} is not a preprocessing layout (name, expected, plan)")
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"stage.input={root.absolute()} does not exist; expected {layout.expected}")
    p = layout.plan(root, check_ratios(split_ratios or DEFAULT_RATIOS), extensions)
    if not p.jobs:
        raise FileNotFoundError(f"stage.input={root.absolute()} holds no videos; expected {layout.expected}")
    return p


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


def list_videos(folder: Path, extensions: Sequence[str], recursive: bool = False) -> list[Path]:
    """The files of ``folder`` (and below, with ``recursive``) whose suffix is one of ``extensions``, sorted."""
    pattern = "**/*" if recursive else "*"
    exts = {e.lower() for e in extensions}
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in exts)


def require_dir(path: Path, layout: str, expected: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"layout={layout}: no folder {path.absolute()}; expected {expected}")


def frames_dir(root: Path, video: Path, top: str) -> str:
    """``<top>/<video's folder, its trailing 'videos' replaced by 'frames'>/<stem>`` (DeepfakeBench's layout)."""
    parts = list(video.relative_to(root).parent.parts)
    if parts and parts[-1] == "videos":
        parts = parts[:-1]
    return "/".join([top, *parts, "frames", video.stem])
