r"""The DeepfakeBench / DF40 JSON index: read it, validate it, build it, write it; map its frame paths to files.

One JSON file per dataset::

    {"<dataset>": {                              e.g. "FF-DF", "Celeb-DF-v2", "simswap_ff", "FSAll_ff"
        "<label name>": {                        e.g. "FF-real", "FF-DF", "CelebDFv2_real"
            "train" | "val" | "test": {
                ["c23" | "c40" | "raw": {]       only for the FaceForensics++ family (FF-*, FaceShifter, DFD)
                    "<video>": {"label": "<label name>", "frames": ["<path>", ...], "masks": [...]}}}}}}

Frame (and mask) paths are what the file says: relative to a data root (POSIX or Windows separators), or absolute
as DeepfakeBench's ``rearrange.py`` writes them for an absolute root and DF40's always are (POSIX, or Windows with a
drive letter such as ``C:\data\FaceForensics++\...``); :class:`FramePathResolver` maps them to files. This module
writes relative POSIX paths.

Validation names the key path of each node that breaks the schema (``FF-DF/FF-real/train/c23/000_003: "frames"
must be a list of strings``). A reader validates what it reads: a problem in a split it reads (or above the split
level) is an :class:`IndexSchemaError`; a problem elsewhere (DeepfakeBench's ``DFDC.json`` has a video record in
place of its ``val`` node) is returned as an :class:`IndexProblem` and logged with its key path, not fatal.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from r2m_lab.atomic import write_json_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
COMPRESSIONS = ("c23", "c40", "raw")


class IndexSchemaError(ValueError):
    """An index that does not follow the DeepfakeBench schema; the message starts with the offending key path."""


@dataclass(frozen=True)
class IndexProblem:
    """One node that breaks the schema: its key path, what is wrong, and the split it sits in (None: above splits)."""

    where: tuple[str, ...]
    message: str
    split: str | None
    source: str | None = None

    def __str__(self) -> str:
        prefix = f"{self.source}: " if self.source is not None else ""
        return f"{prefix}{'/'.join(self.where) or '<top level>'}: {self.message}"

    def error(self) -> IndexSchemaError:
        return IndexSchemaError(str(self))


def _fail(where: Sequence[str], message: str, source: str | os.PathLike[str] | None = None) -> IndexSchemaError:
    return IndexProblem(tuple(where), message, None, None if source is None else str(source)).error()


def _is_record(node: Any) -> bool:
    return isinstance(node, Mapping) and "frames" in node


def _path_problem(record: Mapping[str, Any], key: str, posix: bool) -> str | None:
    paths = record[key]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return f'"{key}" must be a list of strings'
    if posix:
        for p in paths:
            # A written index must be portable: relative, forward slashes (the reader accepts both separators).
            if "\\" in p or PurePosixPath(p).is_absolute() or PureWindowsPath(p).is_absolute():
                return f'"{key}" must hold POSIX paths relative to the data root, got {p!r}'
    return None


def _record_problem(record: Any, label: str, posix: bool) -> str | None:
    if not isinstance(record, Mapping):
        return f"a video record must be an object with 'label' and 'frames', got {type(record).__name__}"
    if "frames" not in record:
        return 'a video record needs "frames" (a list of strings)'
    if record.get("label") != label:
        # The label key groups the videos, the record's label names them: two names for one video is ambiguous.
        return f'"label" must be the label it is filed under ({label!r}), got {record.get("label")!r}'
    problem = _path_problem(record, "frames", posix)
    if problem is None and record.get("masks") is not None:
        problem = _path_problem(record, "masks", posix)
    return problem


def validate_record(where: list[str], record: Any, label: str, posix: bool = False, source: Any = None) -> None:
    """Check one video record; ``where`` is its key path, ``label`` the label node it sits under."""
    problem = _record_problem(record, label, posix)
    if problem is not None:
        raise _fail(where, problem, source)


def _split_problem(node: Any) -> str | None:
    """What is wrong with a split node as a whole (before its videos are looked at), or None."""
    if _is_record(node):
        # DeepfakeBench's rearrange.py writes DFDC's val this way (one video's record instead of {video: record}).
        return "a split must be an object {video: record}, found a single video record in its place"
    if not isinstance(node, Mapping):
        return "a split is an object {video: record} or {compression: {video: record}}"
    comp_keys = _level_keys(node)
    if comp_keys and len(comp_keys) != len(node):
        other = sorted(set(node) - set(comp_keys))[:3]
        return f"mixes compression levels {comp_keys} with videos {other}"
    return None


def index_problems(index: Any, posix: bool = False, source: str | os.PathLike[str] | None = None) -> list[IndexProblem]:
    """Every node of ``index`` that breaks the schema, each with its key path (a broken node is not looked into).

    ``posix`` additionally requires relative POSIX frame paths (what :func:`write_index` writes).
    """
    src = None if source is None else str(source)
    out: list[IndexProblem] = []

    def add(where: Sequence[str], message: str, split: str | None) -> None:
        out.append(IndexProblem(tuple(str(w) for w in where), message, split, src))

    if not isinstance(index, Mapping) or not index:
        add([], "an index is a non-empty object {dataset: {label: {split: ...}}}", None)
        return out
    for dataset, labels in index.items():
        if not isinstance(labels, Mapping) or not labels:
            add([dataset], "a dataset is a non-empty object {label: {split: ...}}", None)
            continue
        for label, splits in labels.items():
            if not isinstance(splits, Mapping):
                add([dataset, label], "a label is an object {split: videos}", None)
                continue
            for split, node in splits.items():
                where = [dataset, label, split]
                if split not in SPLITS:
                    add(where, f"unknown split {split!r}; valid: {list(SPLITS)}", split)
                    continue
                problem = _split_problem(node)
                if problem is not None:
                    add(where, problem, split)
                    continue
                for comp, videos in _levels(node):
                    for video, record in videos.items():
                        problem = _record_problem(record, label, posix)
                        if problem is not None:
                            add([*where, *([comp] if comp else []), video], problem, split)
    return out


def validate_index(
    index: Any,
    posix: bool = False,
    source: str | os.PathLike[str] | None = None,
    splits: Collection[str] | None = None,
    dataset: str | None = None,
) -> list[IndexProblem]:
    """Raise :class:`IndexSchemaError` for the first broken node of what is read; return the other problems.

    What is read: dataset ``dataset`` (None: every dataset), splits ``splits`` (None: every split). A node above the
    split level of a read dataset is always read. Problems outside are returned (each names its key path), so the
    caller can report them without refusing the file.
    """
    tolerated = []
    for problem in index_problems(index, posix, source):
        other_dataset = dataset is not None and problem.where and problem.where[0] != dataset
        other_split = splits is not None and problem.split is not None and problem.split not in splits
        if other_dataset or other_split:
            tolerated.append(problem)
        else:
            raise problem.error()
    return tolerated


def _level_keys(node: Mapping[str, Any]) -> list[str]:
    return [k for k, v in node.items() if k in COMPRESSIONS and isinstance(v, Mapping) and not _is_record(v)]


def _levels(node: Mapping[str, Any]) -> list[tuple[str | None, Mapping[str, Any]]]:
    """A (valid) split's (compression or None, videos) pairs: a split holds either levels or videos."""
    comp_keys = _level_keys(node)
    if not comp_keys:
        return [(None, node)]
    return [(c, node[c]) for c in comp_keys]


def iter_videos(
    labels: Mapping[str, Any], splits: Collection[str] | None = None
) -> Iterator[tuple[str, str, str | None, str, Mapping[str, Any]]]:
    """(label, split, compression or None, video, record) for every video of one dataset mapping.

    Only ``splits`` are walked (None: all); they must have been validated (:func:`validate_index`).
    """
    for label, label_splits in labels.items():
        for split, node in label_splits.items():
            if splits is not None and split not in splits:
                continue
            for comp, videos in _levels(node):
                for video, record in videos.items():
                    yield label, split, comp, video, record


def load_index_json(path: str | os.PathLike[str]) -> Any:
    """The parsed JSON of an index file, not yet validated; a missing file or bad JSON names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No DeepfakeBench index at {path.absolute()}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise IndexSchemaError(f"{path}: not valid JSON ({err})") from err


def read_index(
    path: str | os.PathLike[str], dataset: str | None = None, splits: Collection[str] | None = None
) -> dict[str, Any]:
    """Load and validate an index file; return the whole mapping, or the ``{label: ...}`` mapping of ``dataset``.

    Only ``dataset`` (None: all) and ``splits`` (None: all) are required to be valid; problems elsewhere are logged
    as warnings with their key paths (:func:`validate_index`), and those nodes must not be walked.
    """
    index = load_index_json(path)
    if dataset is not None and isinstance(index, Mapping) and index and dataset not in index:
        raise KeyError(f"{path}: no dataset {dataset!r} at the top level; found {sorted(index)}")
    for problem in validate_index(index, source=path, splits=splits, dataset=dataset):
        log.warning("Index problem outside what is read (not used): %s", problem)
    return index if dataset is None else index[dataset]


def _is_absolute(path: str) -> bool:
    """POSIX absolute, or Windows absolute (drive letter ``C:\\...`` or UNC ``\\\\server\\share``), on any OS."""
    return PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute()


def _parts(path: str) -> tuple[str, ...]:
    """The folder names and file name of an index path, whatever its separators; the anchor (``/``, ``C:\\``) and
    ``.`` parts are left out. PureWindowsPath splits on both separators."""
    pure = PureWindowsPath(path)
    return tuple(p for p in pure.parts[1 if pure.anchor else 0 :] if p not in ("", "."))


class FramePathResolver:
    r"""Map the frame paths of an index to files under a data root.

    The rule, per path:

    1. a relative path is joined under ``root`` (Windows or POSIX separators);
    2. an absolute POSIX path that exists as given is used as given;
    3. otherwise (an absolute path from another machine, a Windows drive-letter path on Linux, or a relative path that
       is not under ``root``) leading folders are dropped, fewest first, until what is left exists under ``root``:
       ``C:\data\FaceForensics++\manipulated_sequences\...\000.png`` with ``root=/mnt/deepfakes`` becomes
       ``/mnt/deepfakes/FaceForensics++/manipulated_sequences/.../000.png`` when that file exists. At least the file
       and its folder are kept, so a stray file at the root never matches. The dropped prefix is remembered and
       tried first for the next paths, so a whole index costs one search per distinct prefix.

    A path that maps to no existing file comes back as rule 1 or 2 gives it (the path to look for), flagged missing.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._prefixes: list[tuple[str, ...]] = []  # dropped leading parts that mapped before, most recent first

    def locate(self, path: str) -> tuple[str, bool]:
        """(the file ``path`` names, whether it exists); see the class docstring. Never raises for a missing file."""
        parts = _parts(path)
        absolute = _is_absolute(path)
        direct = path if absolute else str(self.root.joinpath(*parts))
        if (not absolute or not PureWindowsPath(path).drive) and os.path.isfile(direct):
            return direct, True
        for prefix in self._prefixes:
            if parts[: len(prefix)] == prefix and len(parts) - len(prefix) >= 2:
                candidate = self.root.joinpath(*parts[len(prefix) :])
                if candidate.is_file():
                    return str(candidate), True
        for k in range(0 if absolute else 1, len(parts) - 1):
            candidate = self.root.joinpath(*parts[k:])
            if candidate.is_file():
                self._prefixes.insert(0, parts[:k])
                log.info("Frame paths under %r are read from under %s", "/".join(parts[:k]) or "/", self.root)
                return str(candidate), True
        return direct, False


def write_index(path: str | os.PathLike[str], index: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Validate ``index`` (POSIX relative frame paths required), then write it atomically to ``path``.

    An existing file is someone's prepared data: it is replaced only with ``overwrite=True``.
    """
    path = Path(path)
    validate_index(index, posix=True, source=path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"Index {path.absolute()} already exists; pass overwrite=True to replace it")
    return write_json_atomic(path, index)


def posix_relative(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """``path`` relative to ``root`` with forward slashes, as frame paths are stored; refuses a path outside root."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    except ValueError as err:
        raise ValueError(f"{path} is not inside the data root {root}") from err
    return rel.as_posix()


def video_record(label: str, frames: Sequence[str], masks: Sequence[str] | None = None) -> dict[str, Any]:
    """A video's record: its label name, its frame paths in temporal order (relative to the data root), masks."""
    record: dict[str, Any] = {"label": str(label), "frames": [str(f) for f in frames]}
    if masks is not None:
        record["masks"] = [str(m) for m in masks]
    return record


def add_video(
    index: dict[str, Any],
    dataset: str,
    label: str,
    split: str,
    video: str,
    record: Mapping[str, Any],
    compression: str | None = None,
) -> dict[str, Any]:
    """Insert ``record`` at ``dataset/label/split/[compression/]video`` (creating the nodes); return ``index``.

    A video already there is refused (two records for one video would silently shadow each other).
    """
    where = [dataset, label, split, *([compression] if compression else []), video]
    if split not in SPLITS:
        raise _fail(where, f"unknown split {split!r}; valid: {list(SPLITS)}")
    if compression is not None and compression not in COMPRESSIONS:
        raise _fail(where, f"unknown compression {compression!r}; valid: {list(COMPRESSIONS)}")
    validate_record(where, record, label)
    node = index.setdefault(dataset, {}).setdefault(label, {}).setdefault(split, {})
    has_levels = any(k in COMPRESSIONS and not _is_record(v) for k, v in node.items())
    if node and has_levels != (compression is not None):
        raise _fail(where, "a split holds either compression levels or videos, not both")
    if compression is not None:
        node = node.setdefault(compression, {})
    if video in node:
        raise _fail(where, "video already in the index")
    node[video] = dict(record)
    return index
