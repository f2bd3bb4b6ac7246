"""What a video's crops depend on (:class:`CropSettings`, its manifest's fingerprint) and the stable hash behind it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# Bumped whenever a change here changes the crops: old manifests then no longer count as done.
PREPROCESS_VERSION = 1
NO_FACE_POLICIES = ("skip", "centre")


def stable_hash(obj: Any) -> str:
    """16 hex digits of SHA-256 over key-sorted JSON: equal for equal settings across runs and machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
        return stable_hash({"version": PREPROCESS_VERSION, **self.as_dict()})
