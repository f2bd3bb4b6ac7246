"""Reading the evenly spaced frames of a video, exactly and deterministically (preprocessing and prediction)."""

from __future__ import annotations

import cv2
import numpy as np


class CorruptVideo(Exception):
    """A video that will not open or from which no frame decodes; ``frame_count`` when the header gave one."""

    def __init__(self, reason: str, frame_count: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frame_count = frame_count


def sample_indices(n_frames: int, n: int) -> list[int]:
    """``n`` frame indices evenly spaced over ``n_frames`` (first and last included); all of them if fewer."""
    if n_frames <= n:
        return list(range(n_frames))
    return np.linspace(0, n_frames - 1, n).round().astype(int).tolist()


def count_frames(path: str) -> int:
    """Frames that actually decode, for containers whose header gives no count."""
    cap = cv2.VideoCapture(path)
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    return n


def read_sampled_frames(source: str, n: int) -> tuple[int, list[int], dict[int, np.ndarray]]:
    """``(frame count, the n sampled indices, {index: (H, W, 3) BGR uint8 frame})`` of the video at ``source``.

    A sampled index missing from the dict did not decode (or lies past the real end of a stream whose header
    over-counts). Raises :class:`CorruptVideo` when OpenCV cannot open the file or no sampled frame decodes.
    """
    try:
        cap = cv2.VideoCapture(source)
        if not cap.isOpened():
            raise CorruptVideo("OpenCV cannot open it as a video")
        n_frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if n_frames <= 0:
            n_frames = count_frames(source)
        wanted = sample_indices(n_frames, int(n))
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
        raise CorruptVideo(f"OpenCV: {err}".strip()) from err
    if not frames:
        raise CorruptVideo("no frame decodes" if n_frames > 0 else "no frames", n_frames)
    return n_frames, wanted, frames
