"""Face detectors for ``stage=preprocess`` and ``stage=predict``, and the crop / 5-point alignment they feed.

A detector maps one BGR uint8 frame (as OpenCV decodes it) to a list of :class:`Face` boxes, with five landmarks
(eyes, nose tip, mouth corners, in the image's left-to-right order) where the detector gives them. OpenCV's Haar
cascade ships with ``opencv-python-headless`` and always works; MTCNN (``facenet-pytorch``), dlib and RetinaFace
(``retina-face``) are imported lazily, only when asked for. Asking for one that is not installed raises with the
``pip install`` line: there is no silent fallback to a weaker detector. ``auto`` picks the strongest one installed
and logs which. :class:`FaceCropper` owns one detector and makes the crop both stages use.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

log = logging.getLogger(__name__)

# The ArcFace / InsightFace 5-point template for a 112×112 face crop (left eye, right eye, nose tip, left and right
# mouth corner, in image coordinates). Only these published reference coordinates are used, no code.
TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


@dataclass(frozen=True)
class Face:
    """One detected face: box ``(x0, y0, x1, y1)`` in pixels, a confidence, and (5, 2) landmarks or None."""

    box: tuple[float, float, float, float]
    score: float = 1.0
    landmarks: np.ndarray | None = None

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


class FaceDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in one (H, W, 3) BGR uint8 frame, in no particular order."""
        ...


class HaarDetector:
    """OpenCV's frontal-face Haar cascade: no landmarks, so crops are square boxes around the face (no alignment).

    ``min_size`` is the smallest face searched for, as a fraction of the frame's shorter side (small faces are
    where Haar's false positives live). Frames whose shorter side exceeds ``detect_side`` are searched at that
    size and the boxes scaled back (the crop is cut from the full-resolution frame): the cascade's cost grows with
    the pixel count, and a face big enough to be worth cropping survives the downscale.
    """

    name = "haar"

    def __init__(
        self,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: float = 0.1,
        detect_side: int | None = 360,
        cascade: str | None = None,
    ) -> None:
        path = Path(cascade) if cascade else Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        if not path.is_file():
            raise FileNotFoundError(
                f"Haar cascade not found at {path}; opencv-python-headless>=4.8,<5 ships it in cv2.data.haarcascades"
            )
        self.classifier = cv2.CascadeClassifier(str(path))
        if self.classifier.empty():
            raise OSError(f"OpenCV could not load the Haar cascade {path}")
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.min_size = float(min_size)
        self.detect_side = int(detect_side) if detect_side else None

    def detect(self, image: np.ndarray) -> list[Face]:
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        f = 1.0
        if self.detect_side and min(gray.shape) > self.detect_side:
            f = self.detect_side / min(gray.shape)
            gray = cv2.resize(gray, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        side = max(1, int(self.min_size * min(gray.shape)))
        boxes = self.classifier.detectMultiScale(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(side, side)
        )
        return [
            Face((float(x) / f, float(y) / f, float(x + w) / f, float(y + h) / f))
            for x, y, w, h in np.reshape(boxes, (-1, 4))
        ]


class MTCNNDetector:
    """MTCNN from ``facenet-pytorch`` (boxes, probabilities, five landmarks); weights ship inside the package."""

    name = "mtcnn"

    def __init__(self, device: str = "cpu", min_prob: float = 0.9, min_face_size: int = 20) -> None:
        facenet = _require("mtcnn")
        self.model = facenet.MTCNN(keep_all=True, device=device, min_face_size=int(min_face_size), post_process=False)
        self.min_prob = float(min_prob)

    def detect(self, image: np.ndarray) -> list[Face]:
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        boxes, probs, points = self.model.detect(rgb, landmarks=True)
        if boxes is None:
            return []
        return [
            Face(tuple(float(v) for v in box), float(p), np.asarray(pts, np.float64))
            for box, p, pts in zip(boxes, probs, points, strict=True)
            if p is not None and p >= self.min_prob
        ]


class DlibDetector:
    """dlib's HOG frontal-face detector; with ``landmarks`` (a local ``shape_predictor_5_face_landmarks.dat``) also
    five landmarks, hence alignment. Nothing is downloaded: without the file, crops are boxes."""

    name = "dlib"

    def __init__(self, landmarks: str | None = None, upsample: int = 1) -> None:
        dlib = _require("dlib")
        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.upsample = int(upsample)
        self.predictor = None
        if landmarks:
            if not Path(landmarks).is_file():
                raise FileNotFoundError(
                    f"stage.detector_options.landmarks={landmarks}: no such file (dlib's "
                    "shape_predictor_5_face_landmarks.dat, from http://dlib.net/files/)"
                )
            self.predictor = dlib.shape_predictor(str(landmarks))

    def detect(self, image: np.ndarray) -> list[Face]:
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        faces = []
        for rect in self.detector(rgb, self.upsample):
            points = None
            if self.predictor is not None:
                shape = self.predictor(rgb, rect)
                # dlib's 5-point model: 0-1 one eye's corners, 2-3 the other's, 4 below the nose. Eye centres and
                # the nose point; the mouth corners are not in it, so they are extrapolated below the eyes.
                p = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float64)
                eyes = sorted([p[0:2].mean(0), p[2:4].mean(0)], key=lambda e: e[0])
                down = p[4] - (eyes[0] + eyes[1]) / 2
                points = np.array([eyes[0], eyes[1], p[4], eyes[0] + down, eyes[1] + down])
            faces.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), 1.0, points))
        return faces


class RetinaFaceDetector:
    """RetinaFace from the ``retina-face`` package (boxes, scores, five landmarks). Its weights must already be in
    its cache (``~/.deepface/weights/retinaface.h5``): nothing is downloaded at run time."""

    name = "retinaface"

    def __init__(self, min_score: float = 0.9, weights: str | None = None) -> None:
        cached = Path(weights) if weights else Path.home() / ".deepface" / "weights" / "retinaface.h5"
        if not cached.is_file():
            raise FileNotFoundError(
                f"RetinaFace weights not found at {cached}; put retinaface.h5 there (nothing is downloaded at run "
                "time) or use stage.detector=mtcnn|haar"
            )
        self.module = _require("retinaface").RetinaFace
        self.min_score = float(min_score)

    def detect(self, image: np.ndarray) -> list[Face]:
        found = self.module.detect_faces(image, threshold=self.min_score)
        if not isinstance(found, dict):
            return []
        faces = []
        for item in found.values():
            lm = item["landmarks"]
            # The package names landmarks from the subject's view: its "right_eye" is on the image's left.
            pts = [lm["right_eye"], lm["left_eye"], lm["nose"], lm["mouth_right"], lm["mouth_left"]]
            faces.append(Face(tuple(float(v) for v in item["facial_area"]), float(item["score"]), np.asarray(pts)))
        return faces


# name -> (importable module, pip package, constructor); strongest first (the order `auto` tries).
DETECTORS: dict[str, tuple[str | None, str | None, Callable[..., FaceDetector]]] = {
    "retinaface": ("retinaface", "retina-face", RetinaFaceDetector),
    "mtcnn": ("facenet_pytorch", "facenet-pytorch", MTCNNDetector),
    "dlib": ("dlib", "dlib", DlibDetector),
    "haar": (None, None, HaarDetector),
}


def _require(name: str) -> Any:
    module, package, _ = DETECTORS[name]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"stage.detector={name} needs the {package!r} package, which is not installed: `pip install {package}` "
            "(or choose stage.detector=haar, which needs nothing)"
        ) from err


def installed_detectors() -> list[str]:
    """Detector names whose package can be imported, strongest first (``haar`` always)."""
    return [n for n, (mod, _, _) in DETECTORS.items() if mod is None or importlib.util.find_spec(mod) is not None]


def resolve_detector_name(name: str) -> str:
    """``auto`` → the strongest installed detector (logged); any other name is checked and returned."""
    if name == "auto":
        chosen = installed_detectors()[0]
        log.info("stage.detector=auto: using %s (installed: %s)", chosen, installed_detectors())
        return chosen
    if name not in DETECTORS:
        raise ValueError(f"stage.detector={name!r}; valid: {[*DETECTORS, 'auto']}")
    return name


def make_face_detector(name: str, options: dict[str, Any] | None = None) -> FaceDetector:
    """The detector ``name`` (already resolved: not ``auto``) with its keyword ``options``."""
    if name not in DETECTORS:
        raise ValueError(f"stage.detector={name!r}; valid: {[*DETECTORS, 'auto']}")
    if name != "haar":
        _require(name)  # the install hint first, before any constructor argument is looked at
    try:
        return DETECTORS[name][2](**(options or {}))
    except TypeError as err:
        raise TypeError(f"stage.detector_options {options} do not fit detector {name!r}: {err}") from err


def largest(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box (ties: the higher score, then the leftmost), or None."""
    if not faces:
        return None
    return max(faces, key=lambda f: (f.area, f.score, -f.box[0], -f.box[1]))


def box_crop(image: np.ndarray, face: Face, margin: float, size: int) -> np.ndarray:
    """A ``size``×``size`` crop of a square of side ``margin`` × the box's longer side, centred on the box.

    Parts of the square outside the frame are padded black rather than shifted, so the face stays centred
    (every crop has the same geometry relative to its face).
    """
    cx, cy = face.centre
    side = max(face.box[2] - face.box[0], face.box[3] - face.box[1]) * margin
    return square_crop(image, cx, cy, side, size)


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The frame's central square (side = its shorter side), resized: the ``no_face=centre`` fallback."""
    h, w = image.shape[:2]
    return square_crop(image, w / 2, h / 2, min(h, w), size)


def square_crop(image: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """The square of ``side`` pixels centred at (cx, cy), zero-padded where it leaves the frame, resized to size²."""
    side_px = max(1, int(round(side)))
    x0 = int(round(cx - side_px / 2))
    y0 = int(round(cy - side_px / 2))
    h, w = image.shape[:2]
    pad = [max(0, -y0), max(0, y0 + side_px - h), max(0, -x0), max(0, x0 + side_px - w)]
    if any(pad):
        image = cv2.copyMakeBorder(image, *pad, cv2.BORDER_CONSTANT, value=0)
        x0, y0 = x0 + pad[2], y0 + pad[0]
    crop = image[y0 : y0 + side_px, x0 : x0 + side_px]
    # INTER_AREA when shrinking (no aliasing), cubic when enlarging a small face.
    interp = cv2.INTER_AREA if side_px >= size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def alignment_matrix(landmarks: np.ndarray, margin: float, size: int) -> np.ndarray:
    """The (2, 3) similarity (rotation, uniform scale, shift) taking five landmarks onto the template.

    The 112-pixel template is scaled to ``size`` and shrunk about the crop centre by ``1/margin``, so ``margin``
    means the same as for box crops: how much context around the face the crop keeps. Least squares (Umeyama) over
    the five points, as :class:`skimage.transform.SimilarityTransform` estimates it.
    """
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (5, 2) or not np.isfinite(landmarks).all():
        raise ValueError(f"alignment needs (5, 2) finite landmarks, got shape {landmarks.shape}")
    dst = ((TEMPLATE_112 / 112.0 - 0.5) / margin + 0.5) * size
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26 (estimate() is deprecated there)
        tform = SimilarityTransform.from_estimate(landmarks, dst)
        ok = bool(tform)
    else:
        tform = SimilarityTransform()
        ok = tform.estimate(landmarks, dst)
    if not ok:
        raise ValueError(f"no similarity maps landmarks {landmarks.tolist()} onto the template (degenerate points)")
    return np.asarray(tform.params[:2], np.float64)


def aligned_crop(image: np.ndarray, landmarks: np.ndarray, margin: float, size: int) -> np.ndarray:
    """The face warped by :func:`alignment_matrix` into a ``size``×``size`` crop (outside the frame: black)."""
    matrix = alignment_matrix(landmarks, margin, size)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def crop_face(image: np.ndarray, face: Face, margin: float, size: int) -> tuple[np.ndarray, bool]:
    """The crop of ``face`` and whether it was aligned (landmarks given) rather than a box crop."""
    if face.landmarks is not None:
        return aligned_crop(image, face.landmarks, margin, size), True
    return box_crop(image, face, margin, size), False


class FaceCropper:
    """One detector and the crop geometry: the largest face of a frame, cropped as ``stage=preprocess`` writes it.

    Owning the detector (rather than a module-level cache) makes its lifetime explicit: a preprocessing worker
    builds one per process, ``stage=predict`` one per run. ``margin`` and ``size`` as in :func:`crop_face`.
    """

    def __init__(self, detector: FaceDetector, margin: float, size: int) -> None:
        self.detector = detector
        self.margin = float(margin)
        self.size = int(size)

    @classmethod
    def from_name(cls, name: str, options: dict[str, Any] | None, margin: float, size: int) -> FaceCropper:
        """The cropper over :func:`make_face_detector` ``(name, options)`` (``name`` resolved, not ``auto``)."""
        return cls(make_face_detector(name, options), margin, size)

    def find(self, image: np.ndarray) -> Face | None:
        """The largest face of one (H, W, 3) BGR uint8 frame, or None."""
        return largest(self.detector.detect(image))

    def crop(self, image: np.ndarray, face: Face) -> tuple[np.ndarray, bool]:
        """The (size, size, 3) BGR crop of ``face`` and whether it was aligned on landmarks."""
        return crop_face(image, face, self.margin, self.size)
