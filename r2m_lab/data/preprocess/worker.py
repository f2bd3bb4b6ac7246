"""One video → its frames folder of face crops and ``manifest.json``; the resume check; the process-pool worker.

A :class:`VideoWorker` owns the face detector it crops with (built on first use, so a run that only resumes never
loads one). In-process runs make one worker; a process pool makes one per process through the pool's initializer
(:func:`start_pool_worker`), so each process loads its detector once and nothing is cached at module level beyond
that worker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from r2m_lab.atomic import write_bytes_atomic, write_json_atomic
from r2m_lab.data.faces import FaceCropper, centre_crop
from r2m_lab.data.preprocess.plan import Job
from r2m_lab.data.preprocess.settings import CropSettings
from r2m_lab.data.preprocess.video import CorruptVideo, read_sampled_frames

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Written into a frames folder before its first PNG: a folder holding it (and no manifest) is an unfinished video of
# this code, safe to redo; a folder with neither is someone else's and is never touched without overwrite.
IN_PROGRESS = ".preprocess-in-progress"


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


class VideoWorker:
    """Crops videos into ``out_root`` under one :class:`CropSettings`, with a detector it owns."""

    def __init__(self, settings: CropSettings, out_root: str | Path) -> None:
        self.settings = settings
        self.out_root = Path(out_root)
        self.fingerprint = settings.fingerprint()

    @cached_property
    def cropper(self) -> FaceCropper:
        s = self.settings
        return FaceCropper.from_name(s.detector, dict(s.detector_options), s.margin, s.size)

    def run(self, job: Job) -> dict[str, Any]:
        """:meth:`process`, with any failure of this one video (disk error, detector crash) reported, not raised."""
        try:
            return self.process(job)
        except Exception as err:
            log.exception("preprocess: %s failed", job.name)
            error = f"{type(err).__name__}: {err}"
            return {"source": job.name, "frames_dir": job.out_dir, "status": "failed", "error": error}

    def process(self, job: Job) -> dict[str, Any]:
        """Crop one video into its frames folder and return its manifest (also written there when it decoded).

        A finished folder with this settings fingerprint is not decoded again (its manifest is returned,
        ``resumed`` set). Never raises for bad data: a corrupt video comes back with ``status: corrupt`` and the
        reason, and gets no manifest, so a re-run tries it again.
        """
        folder = self.out_root / job.out_dir
        if folder_state(folder, self.fingerprint) == "done":
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            return {**manifest, "resumed": True}
        base = {"source": job.name, "frames_dir": job.out_dir, "settings": self.fingerprint, "resumed": False}
        try:
            n_frames, wanted, frames = read_sampled_frames(job.source, int(self.settings.frames_per_video))
        except CorruptVideo as bad:
            counted = {} if bad.frame_count is None else {"frame_count": bad.frame_count}
            return {**base, "status": "corrupt", "error": bad.reason, **counted}
        return self._crop_frames(folder, base, n_frames, wanted, frames)

    def _crop_frames(
        self, folder: Path, base: dict[str, Any], n_frames: int, wanted: list[int], frames: Mapping[int, np.ndarray]
    ) -> dict[str, Any]:
        settings, cropper = self.settings, self.cropper
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
            face = cropper.find(image)
            if face is None:
                no_face.append(i)
                if settings.no_face == "skip":
                    continue
                crop = centre_crop(image, settings.size)
                centre.append(i)
            else:
                crop, was_aligned = cropper.crop(image, face)
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


# --- the process pool: one VideoWorker per process, made by the pool's initializer -----------------------------------

_POOL_WORKER: VideoWorker | None = None  # set only in pool processes, by start_pool_worker


def start_pool_worker(settings: CropSettings, out_root: str) -> None:
    """``ProcessPoolExecutor(initializer=...)``: this process's single worker (and one OpenCV thread)."""
    global _POOL_WORKER
    cv2.setNumThreads(1)  # N worker processes × OpenCV's own thread pool would oversubscribe the cores
    _POOL_WORKER = VideoWorker(settings, out_root)


def run_in_pool_worker(job: Job) -> dict[str, Any]:
    """The pool's task: ``job`` on the worker :func:`start_pool_worker` made in this process."""
    if _POOL_WORKER is None:
        raise RuntimeError("run_in_pool_worker runs in a pool started with initializer=start_pool_worker")
    return _POOL_WORKER.run(job)
