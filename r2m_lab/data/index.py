"""The DeepfakeBench / DF40 JSON index: read it, validate it, build it, write it.

One JSON file per dataset::

    {"<dataset>": {                              e.g. "FF-DF", "Celeb-DF-v2", "simswap_ff", "FSAll_ff"
        "<label name>": {                        e.g. "FF-real", "FF-DF", "CelebDFv2_real"
            "train" | "val" | "test": {
                ["c23" | "c40" | "raw": {]       only for the FaceForensics++ family (FF-*, FaceShifter, DFD)
                    "<video>": {"label": "<label name>", "frames": ["<rel path>", ...], "masks": [...]}}}}}}

Frame (and mask) paths are relative to a data root. The released files use Windows separators; this module reads
both, and writes POSIX ones. A file that does not follow the schema is refused with the key path of the first
offending node (``FF-DF/FF-real/train/c23/000_003: "frames" must be a list of strings``), never half-read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from r2m_lab.atomic import write_json_atomic

SPLITS = ("train", "val", "test")
COMPRESSIONS = ("c23", "c40", "raw")


class IndexSchemaError(ValueError):
    """An index that does not follow the DeepfakeBench schema; the message starts with the offending key path."""


def _fail(where: Sequence[str], message: str, source: str | os.PathLike[str] | None = None) -> IndexSchemaError:
    prefix = f"{source}: " if source is not None else ""
    return IndexSchemaError(f"{prefix}{'/'.join(where) or '<top level>'}: {message}")


def _is_record(node: Any) -> bool:
    return isinstance(node, Mapping) and "frames" in node


def _check_paths(where: list[str], record: Mapping[str, Any], key: str, posix: bool, source: Any) -> None:
    paths = record[key]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise _fail(where, f'"{key}" must be a list of strings', source)
    if posix:
        for p in paths:
            # A written index must be portable: relative, forward slashes (the reader accepts both separators).
            if "\\" in p or PurePosixPath(p).is_absolute() or PureWindowsPath(p).is_absolute():
                raise _fail(where, f'"{key}" must hold POSIX paths relative to the data root, got {p!r}', source)


def validate_record(where: list[str], record: Any, label: str, posix: bool = False, source: Any = None) -> None:
    """Check one video record; ``where`` is its key path, ``label`` the label node it sits under."""
    if not isinstance(record, Mapping):
        raise _fail(
            where, f"a video record must be an object with 'label' and 'frames', got {type(record).__name__}", source
        )
    if "frames" not in record:
        raise _fail(where, 'a video record needs "frames" (a list of strings)', source)
    if record.get("label") != label:
        # The label key groups the videos, the record's label names them: two names for one video is ambiguous.
        raise _fail(
            where, f'"label" must be the label it is filed under ({label!r}), got {record.get("label")!r}', source
        )
    _check_paths(where, record, "frames", posix, source)
    if record.get("masks") is not None:
        _check_paths(where, record, "masks", posix, source)


def validate_index(index: Any, posix: bool = False, source: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`IndexSchemaError` naming the key path of the first node that breaks the schema.

    ``posix`` additionally requires relative POSIX frame paths (what :func:`write_index` writes). ``source`` (the
    file) prefixes the message.
    """
    if not isinstance(index, Mapping) or not index:
        raise _fail([], "an index is a non-empty object {dataset: {label: {split: ...}}}", source)
    for dataset, labels in index.items():
        if not isinstance(labels, Mapping) or not labels:
            raise _fail([dataset], "a dataset is a non-empty object {label: {split: ...}}", source)
        for label, splits in labels.items():
            if not isinstance(splits, Mapping):
                raise _fail([dataset, label], "a label is an object {split: videos}", source)
            for split, node in splits.items():
                where = [dataset, label, split]
                if split not in SPLITS:
                    raise _fail(where, f"unknown split {split!r}; valid: {list(SPLITS)}", source)
                if not isinstance(node, Mapping):
                    raise _fail(where, "a split is an object {video: record} or {compression: {video: record}}", source)
                for comp, videos in _levels(where, node, source):
                    for video, record in videos.items():
                        rec_where = [*where, *([comp] if comp else []), str(video)]
                        validate_record(rec_where, record, label, posix, source)


def _levels(where: list[str], node: Mapping[str, Any], source: Any) -> list[tuple[str | None, Mapping[str, Any]]]:
    """A split's (compression or None, videos) pairs; a split holds either compression levels or videos, not both."""
    comp_keys = [k for k, v in node.items() if k in COMPRESSIONS and isinstance(v, Mapping) and not _is_record(v)]
    if not comp_keys:
        return [(None, node)]
    if len(comp_keys) != len(node):
        other = sorted(set(node) - set(comp_keys))[:3]
        raise _fail(where, f"mixes compression levels {comp_keys} with videos {other}", source)
    return [(c, node[c]) for c in comp_keys]


def iter_videos(labels: Mapping[str, Any]) -> Iterator[tuple[str, str, str | None, str, Mapping[str, Any]]]:
    """(label, split, compression or None, video, record) for every video of one (validated) dataset mapping."""
    for label, splits in labels.items():
        for split, node in splits.items():
            for comp, videos in _levels([label, split], node, None):
                for video, record in videos.items():
                    yield label, split, comp, video, record


def read_index(path: str | os.PathLike[str], dataset: str | None = None) -> dict[str, Any]:
    """Load and validate an index file; return the whole mapping, or the ``{label: ...}`` mapping of ``dataset``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No DeepfakeBench index at {path.absolute()}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise IndexSchemaError(f"{path}: not valid JSON ({err})") from err
    validate_index(index, source=path)
    if dataset is None:
        return index
    if dataset not in index:
        raise KeyError(f"{path}: no dataset {dataset!r} at the top level; found {sorted(index)}")
    return index[dataset]


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
