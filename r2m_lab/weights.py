"""Detector checkpoints: safetensors I/O (atomic), θ₀ hashing, lazy per-key access and the JSON/Markdown cards.

A detector checkpoint is one safetensors file whose keys are ``backbone.<timm key>`` and ``head.weight`` /
``head.bias``. Its header metadata records the kind (base | specialist | joint | merged) and the hash of the θ₀ it
descends from; a card (``<stem>.json`` + ``<stem>.md``) beside it says how it was made, and
:func:`provenance` says where a file's weights came from (its sha256 and source layout).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r2m_lab.atomic import atomic_path, write_json_atomic, write_text_atomic

BACKBONE_PREFIX = "backbone."
HEAD_PREFIX = "head."


def state_dict_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over (key, dtype, shape, bytes) in sorted key order: independent of file layout and key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # view as bytes so bfloat16 (no numpy dtype) hashes too
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(functools.partial(fh.read, 1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints), remembered per (path, size, mtime): a ViT-L/14 file
    (1.2 GB) hashes in a few seconds, and θ₀ is hashed by several cards of one run."""
    file = Path(path).expanduser().resolve()
    stat = os.stat(file)
    return _file_sha256(str(file), stat.st_size, stat.st_mtime_ns)


def provenance(path: str | Path, layout: str, **extra: Any) -> dict[str, Any]:
    """Where a checkpoint's weights came from, for its card: the file (absolute path, bytes, sha256) and its layout.

    ``layout`` is a name from :data:`r2m_lab.layouts.LAYOUTS` for an outside file (``"openai_clip"``,
    ``"deepfakebench_clip"``...) or ``"r2m_lab"`` for a checkpoint r2m_lab wrote (a θ₀, specialist or merge).
    ``extra`` adds fields (e.g. ``wrapper="module."``).
    """
    file = Path(path).expanduser().resolve()
    return {"path": str(file), "bytes": file.stat().st_size, "sha256": file_sha256(file), "layout": layout, **extra}


def save_detector(
    path: str | Path,
    backbone: Mapping[str, torch.Tensor],
    head: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
) -> None:
    """Save backbone + head as one safetensors file, atomically (temp file in the same folder, then rename)."""
    tensors = {BACKBONE_PREFIX + k: v.detach().contiguous().cpu() for k, v in backbone.items()}
    tensors.update({HEAD_PREFIX + k: v.detach().contiguous().cpu() for k, v in head.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only state dict over one prefix of a safetensors file; each access reads one tensor (memory-mapped).

    Mergers iterate key by key over N of these, so peak memory stays near one model plus one key per specialist.
    The file is opened per access on purpose: safetensors hands out tensors that view the memory map, and a handle
    kept open keeps every page it ever touched resident (N ViT-L/14 files = N × 1.2 GB of RSS by the end of a pass).
    Opening per key (~1 ms: mmap + header) lets each page go as soon as its tensor does.

    device: where tensors land ("cpu", "cuda", "cuda:1"); a merge whose θ₀ lives on a GPU runs there.
    """

    def __init__(self, path: str | Path, prefix: str = BACKBONE_PREFIX, device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        self.prefix = prefix
        self.device = str(device)
        with self._open() as handle:
            self._keys = [k[len(prefix) :] for k in handle.keys() if k.startswith(prefix)]
            self._metadata = dict(handle.metadata() or {})
        self._key_set = set(self._keys)

    def _open(self):  # noqa: ANN202 — safetensors' handle type is not public
        return safe_open(str(self.path), framework="pt", device=self.device)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(f"{key!r} is not in {self.path} (prefix {self.prefix!r})")
        with self._open() as handle:
            return handle.get_tensor(self.prefix + key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)


class Checkpoint:
    """An opened detector checkpoint: lazy backbone, eager (tiny) head, header metadata."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No checkpoint at {self.path}")
        self.backbone = LazyStateDict(self.path, BACKBONE_PREFIX, device)
        heads = LazyStateDict(self.path, HEAD_PREFIX)
        if not len(self.backbone) or sorted(heads) != ["bias", "weight"]:
            raise ValueError(
                f"{self.path} is not an r2m_lab detector checkpoint: expected 'backbone.*' keys and "
                f"'head.weight'/'head.bias', found {len(self.backbone)} backbone keys and head keys {sorted(heads)}"
            )
        self.head = {k: heads[k] for k in heads}
        self.metadata = self.backbone.metadata()

    @property
    def base_hash(self) -> str:
        return self.metadata.get("base_hash", "")

    def backbone_state(self) -> dict[str, torch.Tensor]:
        return {k: self.backbone[k] for k in self.backbone}

    def card(self) -> dict[str, Any]:
        p = card_path(self.path)
        return json.loads(p.read_text()) if p.is_file() else {}


def card_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint).with_suffix(".json")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ["r2m_lab", "torch", "timm", "lightning", "hydra-core", "torchmetrics", "safetensors", "numpy"]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "not installed"
    return out


def write_card(checkpoint: str | Path, card: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``<stem>.json`` and a human ``<stem>.md`` beside a checkpoint; adds versions and the git commit."""
    full = dict(card)
    full.setdefault("checkpoint", str(Path(checkpoint).name))
    full.setdefault("versions", library_versions())
    full.setdefault("git_commit", git_commit())
    write_json_atomic(card_path(checkpoint), full)
    lines = [f"# {full.get('kind', 'detector')}: {full.get('name', Path(checkpoint).stem)}", ""]
    for key in sorted(full):
        value = full[key]
        if isinstance(value, Mapping):
            lines.append(f"- **{key}**:")
            lines.extend(f"  - {k}: `{v}`" for k, v in sorted(value.items()))
        else:
            lines.append(f"- **{key}**: `{value}`")
    write_text_atomic(Path(checkpoint).with_suffix(".md"), "\n".join(lines) + "\n")
    return full
