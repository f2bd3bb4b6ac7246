"""Atomic file output for tables and plots: write a temp file in the target's folder, then ``os.replace`` it."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (same suffix, so writers that infer the format from it still work).

    Parent folders are created. On normal exit the temp file replaces ``path``; on error it is removed and ``path``
    is left untouched, so readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh random name rather than mkstemp: the writer creates the file, so it gets the usual umask-based mode
    # (mkstemp's 0600 would survive the rename and make tables unreadable to the rest of a group).
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
