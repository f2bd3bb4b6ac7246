"""Embedded synthetic deepfake benchmark: deterministic, offline, generated in seconds.

Real frames are crops of the natural photographs bundled with scikit-image (no network access needed).
Fakes are made from real frames of the same split/domain by one of seven "forgery families". Every family applies
a *common step* to its manipulated region (re-sampling, a faint warm colour cast, a faint fixed 8x8 up-sampler
fingerprint, soft blending) at a family-specific strength, plus a family-specific cue. The shared trace mimics what
real face forgeries have in common (blending boundaries, re-sampling, colour mismatch) and is what gives fine-tuned
specialists' task vectors a shared component, the premise of the R²M merging method. Without it the families'
task vectors come out nearly orthogonal and nothing transfers to held-out families (see
``shared/design/synthetic_benchmark_notes.md``).

Layout of a built benchmark (``build`` returns ``root``)::

    root/manifest.json                      config, generator version, counts per cell, photo table
    root/pretext.npz                        real crops labelled by source-photo id (backbone pretext task)
    root/<split>/<domain>/<source>.npz      one cell: images, labels, video_ids (+ crop bookkeeping)

Each cell holds frames_per_video consecutive frames per pseudo-video: the frames share the source photo, a crop
position that drifts a few pixels per frame, the augmentation and the forgery parameters, so video-level metrics
(mean score per video id) make sense.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "DOMAINS",
    "GENERATOR_VERSION",
    "SEEN_FAMILIES",
    "SOURCES",
    "SPLITS",
    "UNSEEN_FAMILIES",
    "Cell",
    "SyntheticConfig",
    "build",
    "cell_keys",
    "load_cell",
    "load_pretext",
    "max_image_size",
]

logger = logging.getLogger(__name__)

# Bump whenever a change to this file changes the generated pixels: it is part of the cache fingerprint, so stale
# caches are never reused.
GENERATOR_VERSION = "1"

SEEN_FAMILIES = ("swap", "reenact", "synthesis", "edit")  # specialists are trained on these
UNSEEN_FAMILIES = ("djpeg", "grid", "common")  # held out; "common" = common step only, a diagnostic
DOMAINS = ("A", "B")  # A: source domain; B: harder (other photos, resized, JPEG 50-70)
SPLITS = ("train", "val", "test")
SOURCES = ("real", *SEEN_FAMILIES, *UNSEEN_FAMILIES)

# Photos per domain: (scikit-image loader name, rescale factor). Only loaders whose data ships inside the
# scikit-image wheel are listed; others (brain, cells3d, eagle, ...) would try to download through pooch.
# retina is mostly out-of-focus at full size, so it is downscaled (INTER_AREA, i.e. no up-sampling artefacts) to
# give its crops texture comparable with the others.
_PHOTOS_A: tuple[tuple[str, float], ...] = (
    ("astronaut", 1.0),
    ("coffee", 1.0),
    ("chelsea", 1.0),
    ("rocket", 1.0),
    ("immunohistochemistry", 1.0),
)
_PHOTOS_B: tuple[tuple[str, float], ...] = (
    ("camera", 1.0),
    ("moon", 1.0),
    ("grass", 1.0),
    ("gravel", 1.0),
    ("brick", 1.0),
    ("clock", 1.0),
    ("coins", 1.0),
    ("hubble_deep_field", 1.0),
    ("retina", 0.4),
)

# Strength of the common step per family (multiplies resampling mix, colour cast and fingerprint amplitude).
_COMMON_STRENGTH = {
    "swap": 1.0,
    "synthesis": 0.8,
    "reenact": 0.7,
    "edit": 0.5,
    "djpeg": 0.6,
    "grid": 0.6,
    "common": 0.6,
}

# Knobs of the recipe, in grey levels (0-255) or fractions of the image size. Calibrated with a ViT-tiny (patch 8,
# width 96, depth 4, image-ID pretext, 300 fine-tuning steps at lr 1e-4) so that every seen family is learnable
# (own-family AUC 0.91-1.0), families transfer partially through the common step (task-vector cosines 0.11-0.37),
# and domain B is clearly harder (0.45-0.73). What calibration showed: halving the fingerprint (6 -> 3) made swap,
# reenact and edit fall below 0.85; the first reenact cue (1.5 px warp, contrast x0.7-0.85) was not learnable.
_RESAMPLE_RANGE = (0.45, 0.8)  # down-scale factor of the common re-sampling
_CAST_AMPLITUDE = 10.0  # grey levels at strength 1
_CAST_DIRECTION = np.array([1.0, 0.35, -0.8], dtype=np.float32)  # warm: more red, less blue
_FINGERPRINT_AMPLITUDE = 6.0  # RMS grey levels of the 8x8 up-sampler fingerprint at strength 1
_FINGERPRINT_MAX_FREQ = 2  # highest harmonic (cycles per 8 px) of the fingerprint's sinusoids
_FINGERPRINT_CHROMA = 0.2  # chroma part of each sinusoid's weight, relative to the luminance part
_MASK_SOFTNESS = 0.3  # width of the mask's soft edge, as a fraction of the ellipse radius
_SWAP_COLOUR_SHIFT = 14.0  # std of the donor's per-channel offset (colour mismatch)
_REENACT_WARP_PX = 3.0  # std of the smooth displacement field
_REENACT_ZOOM = (1.1, 1.2)
_REENACT_CONTRAST = (0.5, 0.7)
_SYNTHESIS_CHECKER = 2.0  # amplitude of the period-2 checkerboard
_EDIT_HUE_DEG = (12.0, 25.0)
_EDIT_SATURATION = (1.3, 1.8)
_DJPEG_QUALITY_1 = (55, 75)
_DJPEG_QUALITY_2 = (80, 92)
_GRID_AMPLITUDE = 3.0
_DOMAIN_B_RESIZE = (0.55, 0.8)
_DOMAIN_B_QUALITY = (50, 70)
_MAX_DRIFT_PX = 1.5  # per frame, per axis
_MIN_CROP_STD = 6.0  # reject near-uniform crops (sky, black background): nothing to forge there


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and seed of the synthetic benchmark. Counts are per cell (one split x domain x source).

    ``train_videos`` applies to train/A/real and each train/A/<seen family>; ``val_videos`` to val A and B (real
    and seen families); ``test_videos`` to every test cell (A and B, real, seen and, in A, unseen families).
    ``pretext_images`` real crops from the train regions of all photos, labelled by photo, feed the backbone's
    pretext task.
    """

    seed: int = 0
    image_size: int = 64
    frames_per_video: int = 8
    train_videos: int = 250
    val_videos: int = 40
    test_videos: int = 125
    pretext_images: int = 4000

    def fingerprint(self) -> str:
        """Short stable hash of every field and GENERATOR_VERSION; names the cache folder."""
        payload = json.dumps({**dataclasses.asdict(self), "generator_version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


@dataclass
class Cell:
    """One cell of the benchmark: all frames of one split x domain x source.

    ``video_ids`` are unique across the whole benchmark (``synthetic/<split>/<domain>/<source>/<index>``), so
    frames can be grouped into videos after cells are concatenated.
    """

    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    labels: np.ndarray  # (N,) int64, 0 real / 1 fake
    video_ids: np.ndarray  # (N,) str


def cell_keys() -> list[tuple[str, str, str]]:
    """Every (split, domain, source) cell the benchmark contains, in generation order.

    Unseen families exist only in test/A; their real counterpart is test/A/real. Train exists only for domain A.
    """
    keys: list[tuple[str, str, str]] = [("train", "A", s) for s in ("real", *SEEN_FAMILIES)]
    for split in ("val", "test"):
        for domain in DOMAINS:
            keys += [(split, domain, s) for s in ("real", *SEEN_FAMILIES)]
    keys += [("test", "A", s) for s in UNSEEN_FAMILIES]
    return keys


def _cell_videos(cfg: SyntheticConfig, split: str) -> int:
    return {"train": cfg.train_videos, "val": cfg.val_videos, "test": cfg.test_videos}[split]


def _cell_path(root: Path, split: str, domain: str, source: str) -> Path:
    return Path(root) / split / domain / f"{source}.npz"


# ----------------------------------------------------------------------------------------------------------------
# Photos and regions


@functools.lru_cache(maxsize=1)
def _load_photos() -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
    """All photos of both domains as uint8 RGB arrays, in class-id order (domain A first)."""
    import skimage.data  # deferred: importing scikit-image costs ~1 s and only generation needs it

    names, arrays = [], []
    for name, scale in (*_PHOTOS_A, *_PHOTOS_B):
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)
        if scale != 1.0:
            size = (round(img.shape[1] * scale), round(img.shape[0] * scale))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        names.append(name)
        arrays.append(img)
    return tuple(names), tuple(arrays)


def _domain_photo_ids(domain: str) -> list[int]:
    n_a = len(_PHOTOS_A)
    return list(range(n_a)) if domain == "A" else list(range(n_a, n_a + len(_PHOTOS_B)))


def _regions(shape: tuple[int, ...]) -> dict[str, tuple[int, int, int, int]]:
    """Disjoint (y0, x0, y1, x1) rectangles of one photo for train, val and test.

    The first 55 % of the long axis is train; the rest is cut across the short axis into val (40 %) and test
    (60 %). A crop lies entirely inside one rectangle, so no pixel of a val/test crop ever appears in a train crop
    (or in the pretext crops, which come from train regions). This layout keeps val and test at least ~120 px wide
    on the smallest photo, so crops up to that size fit.
    """
    h, w = shape[:2]
    if w >= h:
        xs = int(w * 0.55)
        yv = int(h * 0.4)
        return {"train": (0, 0, h, xs), "val": (0, xs, yv, w), "test": (yv, xs, h, w)}
    ys = int(h * 0.55)
    xv = int(w * 0.4)
    return {"train": (0, 0, ys, w), "val": (ys, 0, h, xv), "test": (ys, xv, h, w)}


def max_image_size() -> int:
    """Largest ``image_size`` for which every region of every photo holds a crop (with a little room to drift)."""
    _, photos = _load_photos()
    sizes = [min(y1 - y0, x1 - x0) for p in photos for (y0, x0, y1, x1) in _regions(p.shape).values()]
    return min(sizes) - 8


def _sample_tracks(
    rng: np.random.Generator, photo_ids: list[int], split: str, n: int, frames: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` pseudo-video crop tracks inside the ``split`` region of the given photos.

    Returns photo ids (n,) and top-left positions (n, frames, 2) as (y, x). The crop drifts linearly by up to
    _MAX_DRIFT_PX per frame; the drift is clamped so the whole track stays inside the region.
    """
    _, photos = _load_photos()
    pid = rng.choice(np.asarray(photo_ids), size=n)
    pos = np.zeros((n, frames, 2), dtype=np.int32)
    t = np.arange(frames, dtype=np.float64)
    for i in range(n):
        img = photos[pid[i]]
        y0, x0, y1, x1 = _regions(img.shape)[split]
        room = np.array([y1 - y0 - size, x1 - x0 - size], dtype=np.float64)
        if (room < 0).any():
            raise ValueError(f"image_size {size} too large for the photo regions (max {max_image_size()})")
        # Rejection sampling against near-uniform crops; after a few tries keep the last draw so tiny or flat
        # regions can never loop forever.
        for _ in range(12):
            vel = rng.uniform(-_MAX_DRIFT_PX, _MAX_DRIFT_PX, size=2)
            vel = np.clip(vel, -room / max(frames - 1, 1), room / max(frames - 1, 1))
            span = np.abs(vel) * (frames - 1)
            start = rng.uniform(0, 1, size=2) * (room - span) + np.where(vel < 0, span, 0)
            track = np.rint(start[None, :] + vel[None, :] * t[:, None]).astype(np.int32)
            track = np.clip(track, 0, room.astype(np.int32)) + np.array([y0, x0], dtype=np.int32)
            cy, cx = track[frames // 2]
            if img[cy : cy + size, cx : cx + size].std() >= _MIN_CROP_STD:
                break
        pos[i] = track
    return pid, pos


def _extract(pid: np.ndarray, pos: np.ndarray, size: int) -> np.ndarray:
    """Cut the crops of tracks from `_sample_tracks` -> (n, frames, size, size, 3) uint8."""
    _, photos = _load_photos()
    n, frames = pos.shape[:2]
    out = np.empty((n, frames, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = photos[pid[i]]
        for f in range(frames):
            y, x = pos[i, f]
            out[i, f] = img[y : y + size, x : x + size]
    return out


def _augment(rng: np.random.Generator, video: np.ndarray) -> np.ndarray:
    """Random horizontal flip and mild colour jitter (gain, per-channel gain, offset) of one (T, H, W, 3) uint8
    video -> float32.

    Drawn per video, not per frame, so a pseudo-video looks like one continuous shot. The per-channel gain also
    tints the grey photos slightly, so domain B is not trivially colourless.
    """
    flip = rng.random() < 0.5
    gain = (rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, size=3)).astype(np.float32)
    offset = np.float32(rng.uniform(-4.0, 4.0))
    if flip:
        video = video[:, :, ::-1]
    return video.astype(np.float32) * gain + offset


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Round float pixels to uint8 with saturation (one temporary: this runs on every generated frame)."""
    y = np.add(x, 0.5, dtype=np.float32)
    np.clip(y, 0.0, 255.0, out=y)
    return y.astype(np.uint8)  # truncation after +0.5 = rounding half up


# ----------------------------------------------------------------------------------------------------------------
# Forgery


def _fingerprint_pattern(seed: int) -> np.ndarray:
    """The benchmark's fixed 8x8 up-sampler fingerprint (zero mean, unit RMS, (8, 8, 3)), from the seed.

    A sum of period-8 and period-4 sinusoids (random amplitudes and phases), mostly in luminance with a little
    chroma. Deliberately not white noise: an 8x8 noise pattern lives at the same frequencies as JPEG blocking and
    quantisation noise, so detectors keyed on it fired on *real* compressed (domain B) frames and AUCs inverted.
    A low-order periodic ripple is also closer to what transposed-convolution up-samplers leave behind.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(b"upsampler-fingerprint")]))
    yy, xx = np.mgrid[0:8, 0:8].astype(np.float32)
    pat = np.zeros((8, 8, 3), dtype=np.float32)
    for ky in range(-_FINGERPRINT_MAX_FREQ, _FINGERPRINT_MAX_FREQ + 1):
        for kx in range(0, _FINGERPRINT_MAX_FREQ + 1):
            if kx == 0 and ky <= 0:
                continue  # (0, 0) is the mean; (0, -k) duplicates (0, k)
            wave = np.cos(2 * np.pi * (ky * yy + kx * xx) / 8 + rng.uniform(0, 2 * np.pi))
            weight = rng.standard_normal() * np.array([1.0, 1.0, 1.0]) + _FINGERPRINT_CHROMA * rng.standard_normal(3)
            pat += wave[:, :, None] * weight.astype(np.float32)
    pat -= pat.mean(axis=(0, 1), keepdims=True)
    return pat / np.sqrt((pat**2).mean())


def _tile(pattern: np.ndarray, size: int) -> np.ndarray:
    reps = -(-size // pattern.shape[0])
    return np.tile(pattern, (reps, reps, 1))[:size, :size]


def _soft_ellipse(rng: np.random.Generator, size: int) -> np.ndarray:
    """Face-like soft elliptical mask (size, size) float32 in [0, 1], random size and position near the centre."""
    cy, cx = size * (0.5 + rng.uniform(-0.08, 0.08, size=2))
    ay = size * rng.uniform(0.25, 0.38)  # taller than wide, like a face
    ax = size * rng.uniform(0.2, 0.32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    r = np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)
    m = np.clip((1.0 - r) / _MASK_SOFTNESS + 0.5, 0.0, 1.0)
    return (m * m * (3.0 - 2.0 * m)).astype(np.float32)  # smoothstep: no visible kink at the edge


def _resample(frames: np.ndarray, factor: float, down: int, up: int) -> np.ndarray:
    """Down-scale (T, H, W, C) frames by ``factor`` and back up, all frames in one cv2 call (channels stacked)."""
    t, h, w, c = frames.shape
    stacked = frames.transpose(1, 2, 0, 3).reshape(h, w, t * c)
    small = max(2, round(h * factor)), max(2, round(w * factor))
    lo = cv2.resize(stacked, (small[1], small[0]), interpolation=down)
    hi = cv2.resize(lo, (w, h), interpolation=up)
    return hi.reshape(h, w, t, c).transpose(2, 0, 1, 3)


def _jpeg(frames: np.ndarray, quality: int, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """JPEG round trip of (T, H, W, 3) RGB frames (float or uint8) -> float32.

    ``offset`` (dy, dx) in [0, 8) shifts the codec's 8x8 block grid against the frame (reflect padding, cropped
    off after decoding), like a face crop cut at an arbitrary position out of a compressed video frame.
    """
    dy, dx = offset
    h, w = frames.shape[1:3]
    out = np.empty(frames.shape, dtype=np.float32)
    for i, f in enumerate(_to_uint8(frames)):
        if dy or dx:
            f = cv2.copyMakeBorder(f, dy, 8 - dy, dx, 8 - dx, cv2.BORDER_REFLECT_101)
        ok, enc = cv2.imencode(".jpg", f[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])  # cv2 wants BGR
        if not ok:  # pragma: no cover - cv2 only fails on invalid input
            raise RuntimeError("JPEG encoding failed")
        out[i] = cv2.imdecode(enc, cv2.IMREAD_COLOR)[dy : dy + h, dx : dx + w, ::-1]
    return out


def _common_step(region: np.ndarray, strength: float, rng: np.random.Generator, fingerprint: np.ndarray) -> np.ndarray:
    """The trace shared by every fake: re-sampling, warm colour cast and the up-sampler fingerprint, all scaled
    by ``strength`` (the region is later soft-blended by the caller)."""
    size = region.shape[1]
    factor = rng.uniform(*_RESAMPLE_RANGE)
    delta = _resample(region, factor, cv2.INTER_LINEAR, cv2.INTER_LINEAR)
    delta -= region
    delta += _CAST_AMPLITUDE * _CAST_DIRECTION + _FINGERPRINT_AMPLITUDE * _tile(fingerprint, size)
    delta *= np.float32(strength)
    return delta + region


def _hsv_edit(region: np.ndarray, hue_deg: float, sat: float) -> np.ndarray:
    t, h, w, _ = region.shape
    rgb = np.clip(region / 255.0, 0, 1).astype(np.float32).reshape(t * h, w, 3)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # float input: H in degrees [0, 360), S and V in [0, 1]
    hsv[..., 0] = np.mod(hsv[..., 0] + hue_deg, 360.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 1)
    return (cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0).reshape(t, h, w, 3)


def _warp(region: np.ndarray, rng: np.random.Generator, centre: tuple[float, float]) -> np.ndarray:
    """Smooth random displacement field plus a zoom about ``centre``, the same for every frame of the video."""
    t, h, w, _ = region.shape
    coarse = rng.standard_normal((4, 4, 2)).astype(np.float32) * _REENACT_WARP_PX
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    zoom = rng.uniform(*_REENACT_ZOOM)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    map_y = (centre[0] + (yy - centre[0]) / zoom + field[..., 0]).astype(np.float32)
    map_x = (centre[1] + (xx - centre[1]) / zoom + field[..., 1]).astype(np.float32)
    stacked = region.transpose(1, 2, 0, 3).reshape(h, w, t * 3)
    out = cv2.remap(stacked, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return out.reshape(h, w, t, 3).transpose(2, 0, 1, 3)


def _forge(
    frames: np.ndarray,
    family: str,
    rng: np.random.Generator,
    fingerprint: np.ndarray,
    donor: Callable[[], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn one real pseudo-video (T, H, W, 3) float32 into a fake of ``family``; returns (fake float32, mask).

    The forgery parameters are drawn once per video. ``donor`` returns another real video of the same shape (same
    split and domain) for ``swap``. The mask is (H, W) float32 in [0, 1] (all ones for ``synthesis``).
    """
    size = frames.shape[1]
    mask = np.ones((size, size), dtype=np.float32) if family == "synthesis" else _soft_ellipse(rng, size)
    m = mask[None, :, :, None]
    strength = _COMMON_STRENGTH[family]

    if family == "swap":
        if donor is None:
            raise ValueError("swap needs a donor sampler")
        region = donor() + rng.normal(0.0, _SWAP_COLOUR_SHIFT, size=3).astype(np.float32)  # colour mismatch
    elif family == "reenact":
        w = mask.sum()
        cy = float((mask.sum(axis=1) * np.arange(size)).sum() / w)
        cx = float((mask.sum(axis=0) * np.arange(size)).sum() / w)
        region = _warp(frames, rng, (cy, cx))
        # Flatten contrast around the region's mean (per frame and channel): reenactment renders look "flat".
        mean = (region * m).sum(axis=(1, 2), keepdims=True) / mask.sum()
        region = mean + rng.uniform(*_REENACT_CONTRAST) * (region - mean)
    elif family == "edit":
        hue = rng.uniform(*_EDIT_HUE_DEG) * rng.choice([-1.0, 1.0])
        region = _hsv_edit(frames, hue, rng.uniform(*_EDIT_SATURATION))
    elif family == "djpeg":
        # Misaligned double JPEG: the first compression's 8x8 grid is shifted against the second's.
        dy, dx = rng.integers(1, 8, size=2)
        shifted = np.roll(frames, (-dy, -dx), axis=(1, 2))
        once = np.roll(_jpeg(shifted, rng.integers(*_DJPEG_QUALITY_1, endpoint=True)), (dy, dx), axis=(1, 2))
        region = _jpeg(once, rng.integers(*_DJPEG_QUALITY_2, endpoint=True))
    elif family in ("synthesis", "grid", "common"):
        region = frames
    else:
        raise ValueError(f"unknown family {family!r}; valid: {SEEN_FAMILIES + UNSEEN_FAMILIES}")

    region = _common_step(region, strength, rng, fingerprint)
    if family == "synthesis":
        checker = np.where((np.add.outer(np.arange(size), np.arange(size)) % 2) == 0, 1.0, -1.0)
        region = region + _SYNTHESIS_CHECKER * checker[None, :, :, None].astype(np.float32)
    elif family == "grid":
        idx = np.arange(size) % 4 == 0
        lines = (idx[:, None] | idx[None, :]).astype(np.float32)
        region = region + _GRID_AMPLITUDE * (lines - lines.mean())[None, :, :, None]
    return frames + m * (region - frames), mask


def _degrade_domain_b(rng: np.random.Generator, frames: np.ndarray) -> np.ndarray:
    """Domain B's capture pipeline, applied to real and fake alike after any forgery: resize down (area) and back
    up (linear) by a per-video factor, then JPEG at a per-video quality and block-grid offset.

    The random grid offset matters: with the codec's 8x8 grid aligned to the crop, blocking artefacts line up with
    the 8x8 up-sampler fingerprint and real B frames (sharper, hence blockier) looked *more* fake than B fakes,
    which inverted AUCs instead of just making B harder.
    """
    size = frames.shape[1]
    factor = rng.uniform(*_DOMAIN_B_RESIZE)
    small = max(2, round(size * factor))
    quality = int(rng.integers(*_DOMAIN_B_QUALITY, endpoint=True))
    offset = (int(rng.integers(0, 8)), int(rng.integers(0, 8)))
    u8 = _to_uint8(frames)
    resized = np.stack(
        [
            cv2.resize(
                cv2.resize(f, (small, small), interpolation=cv2.INTER_AREA),
                (size, size),
                interpolation=cv2.INTER_LINEAR,
            )
            for f in u8
        ]
    )
    return _jpeg(resized, quality, offset)


# ----------------------------------------------------------------------------------------------------------------
# Cells


def _rng(cfg: SyntheticConfig, key: str) -> np.random.Generator:
    """Independent generator per named stream, so cells don't depend on generation order or on each other."""
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, zlib.crc32(key.encode())]))


def _generate_cell(
    cfg: SyntheticConfig, split: str, domain: str, source: str, on_video: Callable[[int], None] | None = None
) -> dict[str, np.ndarray]:
    """Arrays of one cell: images, labels, video_ids, plus bookkeeping ``boxes`` (N, 5) = photo id, y, x, h, w of
    each frame's source crop, and ``donor_boxes`` (same, -1 where there is no donor)."""
    rng = _rng(cfg, f"cell/{split}/{domain}/{source}")
    size, frames = cfg.image_size, cfg.frames_per_video
    n = _cell_videos(cfg, split)
    photo_ids = _domain_photo_ids(domain)
    fingerprint = _fingerprint_pattern(cfg.seed)

    pid, pos = _sample_tracks(rng, photo_ids, split, n, frames, size)
    videos = _extract(pid, pos, size)
    donor_boxes = np.full((n, frames, 5), -1, dtype=np.int32)

    out = np.empty((n, frames, size, size, 3), dtype=np.uint8)
    for i in range(n):
        video = _augment(rng, videos[i])
        if source != "real":
            donor = None
            if source == "swap":

                def donor(i: int = i) -> np.ndarray:
                    # Prefer another photo: the donor then brings foreign content, like a swapped identity.
                    others = [p for p in photo_ids if p != pid[i]] or photo_ids
                    dpid, dpos = _sample_tracks(rng, others, split, 1, frames, size)
                    donor_boxes[i, :, 0] = dpid[0]
                    donor_boxes[i, :, 1:3] = dpos[0]
                    donor_boxes[i, :, 3:] = size
                    return _augment(rng, _extract(dpid, dpos, size)[0])

            video, _ = _forge(video, source, rng, fingerprint, donor)
        if domain == "B":
            video = _degrade_domain_b(rng, video)
        out[i] = _to_uint8(video)
        if on_video is not None:
            on_video(frames)

    boxes = np.concatenate(
        [np.repeat(pid[:, None, None], frames, axis=1), pos, np.full((n, frames, 2), size, dtype=np.int32)], axis=2
    ).astype(np.int32)
    ids = np.repeat(np.array([f"synthetic/{split}/{domain}/{source}/{i:04d}" for i in range(n)]), frames)
    return {
        "images": out.reshape(n * frames, size, size, 3),
        "labels": np.full(n * frames, 0 if source == "real" else 1, dtype=np.int64),
        "video_ids": ids,
        "boxes": boxes.reshape(n * frames, 5),
        "donor_boxes": donor_boxes.reshape(n * frames, 5),
    }


def _generate_pretext(cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """Single real crops from the train regions of all photos (both domains), labelled by photo id."""
    rng = _rng(cfg, "pretext")
    names, _ = _load_photos()
    size = cfg.image_size
    pid, pos = _sample_tracks(rng, list(range(len(names))), "train", cfg.pretext_images, 1, size)
    crops = _extract(pid, pos, size)[:, 0]
    images = np.stack([_to_uint8(_augment(rng, c[None]))[0] for c in crops]) if len(crops) else crops
    boxes = np.concatenate([pid[:, None], pos[:, 0], np.full((len(pid), 2), size)], axis=1).astype(np.int32)
    return {"images": images, "labels": pid.astype(np.int64), "class_names": np.array(names), "boxes": boxes}


def build(cfg: SyntheticConfig, cache_dir: str | Path, progress: bool = True) -> Path:
    """Generate (or reuse) the benchmark under ``cache_dir/f"synthetic-{cfg.fingerprint()}"`` and return that
    folder.

    A folder that already holds a ``manifest.json`` is reused as is. Otherwise the benchmark is generated into a
    temporary folder beside the target and renamed into place, so a crash never leaves a half-written benchmark
    and two concurrent builders both end up with one complete copy. Shows a tqdm progress bar when ``progress``.
    """
    cache_dir = Path(cache_dir)
    root = cache_dir / f"synthetic-{cfg.fingerprint()}"
    if (root / "manifest.json").is_file():
        logger.debug("reusing synthetic benchmark at %s", root)
        return root
    max_size = max_image_size()
    if not 8 <= cfg.image_size <= max_size:
        raise ValueError(f"image_size must be in [8, {max_size}], got {cfg.image_size}")
    if cfg.frames_per_video < 1 or min(cfg.train_videos, cfg.val_videos, cfg.test_videos, cfg.pretext_images) < 1:
        raise ValueError(f"counts must be positive: {cfg}")

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=cache_dir))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the benchmark is a shared, read-only cache
    try:
        keys = cell_keys()
        total = sum(_cell_videos(cfg, s) * cfg.frames_per_video for s, _, _ in keys) + cfg.pretext_images
        counts: dict[str, dict[str, int]] = {}
        with tqdm(total=total, desc="synthetic benchmark", unit="frame", disable=not progress) as bar:
            pretext = _generate_pretext(cfg)
            np.savez(tmp / "pretext.npz", **pretext)
            bar.update(cfg.pretext_images)
            for split, domain, source in keys:
                arrays = _generate_cell(cfg, split, domain, source, on_video=bar.update)
                path = _cell_path(tmp, split, domain, source)
                path.parent.mkdir(parents=True, exist_ok=True)
                # Uncompressed: natural-image crops barely compress and loading stays a plain read.
                np.savez(path, **arrays)
                counts[f"{split}/{domain}/{source}"] = {
                    "frames": len(arrays["labels"]),
                    "videos": _cell_videos(cfg, split),
                    "label": int(arrays["labels"][0]),
                }
        names, _ = _load_photos()
        manifest = {
            "name": "synthetic",
            "generator_version": GENERATOR_VERSION,
            "fingerprint": cfg.fingerprint(),
            "config": dataclasses.asdict(cfg),
            "seen_families": list(SEEN_FAMILIES),
            "unseen_families": list(UNSEEN_FAMILIES),
            "domains": list(DOMAINS),
            "photos": {d: [names[i] for i in _domain_photo_ids(d)] for d in DOMAINS},
            "common_strength": _COMMON_STRENGTH,
            "pretext": {"images": cfg.pretext_images, "classes": list(names)},
            "cells": counts,
        }
        # The manifest is written last: its presence marks a complete benchmark.
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / "manifest.json").is_file():
                raise
            logger.info("another process finished %s first; using its copy", root)  # rename lost a race
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("synthetic benchmark written to %s", root)
    return root


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _check_root(root: Path) -> None:
    if not (Path(root) / "manifest.json").is_file():
        raise FileNotFoundError(f"{root} is not a synthetic benchmark (no manifest.json); create it with build()")


def load_cell(root: str | Path, split: str, domain: str, source: str) -> Cell:
    """Load one cell of a built benchmark.

    ``split`` in SPLITS, ``domain`` in DOMAINS, ``source`` in SOURCES. Raises ValueError for an unknown name and
    FileNotFoundError for a valid name that is not a cell (e.g. train/B, or an unseen family outside test/A); both
    messages list the valid choices.
    """
    root = Path(root)
    for what, value, valid in (("split", split, SPLITS), ("domain", domain, DOMAINS), ("source", source, SOURCES)):
        if value not in valid:
            raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    _check_root(root)
    path = _cell_path(root, split, domain, source)
    if (split, domain, source) not in cell_keys() or not path.is_file():
        cells = ", ".join("/".join(k) for k in cell_keys())
        raise FileNotFoundError(f"no cell {split}/{domain}/{source} in {root}; cells that exist: {cells}")
    with np.load(path, allow_pickle=False) as z:
        return Cell(images=z["images"], labels=z["labels"], video_ids=z["video_ids"])


def load_pretext(root: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pretext data: images (N, H, W, 3) uint8, source-photo class ids (N,) int64 and the class (photo) names.

    The crops come from the train regions only, so a backbone pretrained on them has seen no val/test pixel.
    """
    root = Path(root)
    _check_root(root)
    with np.load(root / "pretext.npz", allow_pickle=False) as z:
        return z["images"], z["labels"], [str(s) for s in z["class_names"]]
