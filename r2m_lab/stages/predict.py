"""stage=predict: P(fake) for a user's video, image or folder of them, with one specialist or merged checkpoint.

Per video: ``stage.frames`` frame indices evenly spaced over it (the same sampling and exact sequential decoding as
``stage=preprocess``), the largest face of each found and cropped exactly as preprocessing crops it (detector,
``margin``, ``size``), then the model's own input transform (resize, normalisation: ``model_input_config``). Each
frame with a face gets P(fake); the video's score is their mean (``stage.reduce``: median or max), computed by the
same :func:`~r2m_lab.evaluation.metrics.video_scores` evaluation uses. An image is a one-frame video.

The decision is ``score >= threshold`` (evaluation's rule) at the threshold stored in the checkpoint's card (fitted
on validation when it was trained); a checkpoint without one (a merge) is decided at 0.5 and every row says so, and
``stage.threshold`` overrides either, recorded as given.

Bad input: in a folder, a file that is not a video or image, or one that does not decode, is reported (a row and a
warning) and skipped (given alone, it is an error); a video or image with no detectable face gets a ``no_face`` row
with no score (the background is never scored); a checkpoint that is not safetensors (a pickle, ``torch.save`` or
TorchScript archive, which need code run to load) is refused.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from r2m_lab.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from r2m_lab.data.faces import Face, FaceCropper, resolve_detector_name
from r2m_lab.data.loaders import FrameDataset, build_transform, eval_loader
from r2m_lab.data.preprocess.video import CorruptVideo, read_sampled_frames
from r2m_lab.data.sources import FrameSet
from r2m_lab.detector import Detector, score_frames
from r2m_lab.evaluation.metrics import video_scores
from r2m_lab.stages.artifacts import output_dir
from r2m_lab.stages.config_nodes import plain
from r2m_lab.stages.evaluate import resolve_model
from r2m_lab.stages.models import load_detector, model_input_config, resolve_device
from r2m_lab.weights import Checkpoint, card_path

log = logging.getLogger(__name__)

REDUCTIONS = ("mean", "median", "max")
ITEM_COLUMNS = (
    "input", "kind", "status", "score", "decision", "threshold", "threshold_stored",
    "frames_sampled", "frames_scored", "frames_no_face", "frames_unreadable", "message",
)  # fmt: skip
OUTPUT_FILES = ("predictions.json", "predictions.csv", "predictions_frames.csv")
FRAME_COLUMNS = ("input", "frame", "status", "score", "decision", "x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class Threshold:
    """The decision threshold, whether the checkpoint stored it, and where it came from (said in every output)."""

    value: float
    stored: bool
    source: str


@dataclass(frozen=True)
class Inputs:
    """What ``stage.input`` names: ``(path, kind)`` with kind ``video`` | ``image`` | ``other``, and its root."""

    root: Path
    items: list[tuple[Path, str]]
    folder: bool

    def name(self, path: Path) -> str:
        """How outputs name a file: its path under the input folder (POSIX), or its file name."""
        return path.relative_to(self.root).as_posix() if self.folder else path.name


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.stage.input`` with ``cfg.stage.model``; write predictions.json, predictions.csv (one row per
    file), predictions_frames.csv (one row per sampled frame) and, with ``stage.annotate``, annotated frames, into
    ``stage.output`` or the run folder. Returns the JSON's content."""
    st = cfg.stage
    if st.input is None:
        raise ValueError("stage=predict needs stage.input=<a video, an image, or a folder of them>")
    frames, reduce = int(st.frames), str(st.reduce)
    if frames < 1:
        raise ValueError(f"stage.frames={st.frames}; give a positive number of frames per video")
    if reduce not in REDUCTIONS:
        raise ValueError(f"stage.reduce={reduce!r}; valid: {list(REDUCTIONS)}")
    out = Path(str(st.output)).absolute() if st.output is not None else output_dir(cfg)
    inputs = list_inputs(Path(str(st.input)), st.video_extensions, st.image_extensions, exclude=out)

    spec = str(st.model)
    if spec == "ensemble":
        raise ValueError("stage.model=ensemble is several checkpoints; stage=predict scores one (merged | joint | "
                         "specialist:<data name> | /path/to/checkpoint.safetensors)")  # fmt: skip
    label, path = resolve_model(cfg, spec)
    checkpoint = open_checkpoint(path)
    card = checkpoint.card()
    trained_on = card.get("backbone")
    if trained_on is not None and str(trained_on) != str(cfg.backbone.name):
        raise ValueError(f"{path} was made with backbone={trained_on}; run stage=predict with backbone={trained_on} "
                         f"(now backbone={cfg.backbone.name})")  # fmt: skip
    threshold = decision_threshold(st.threshold, card, path)
    if not threshold.stored:
        log.warning("predict: %s", threshold.source)
    model = load_detector(cfg, checkpoint)
    transform = build_transform(model_input_config(cfg, model))
    cropper = FaceCropper.from_name(
        resolve_detector_name(str(st.detector)), plain(st.detector_options) or {}, float(st.margin), int(st.size)
    )
    scorer = FrameScorer(model, transform, resolve_device(cfg), int(cfg.eval_batch_size))
    annotate_dir = out / "annotated" if bool(st.annotate) else None

    rows = []
    bar = tqdm(inputs.items, desc="predict", unit="file", disable=not (inputs.folder and bool(st.progress)))
    for file, kind in bar:
        name = inputs.name(file)
        row = predict_file(file, name, kind, frames, reduce, cropper, scorer, threshold, annotate_dir)
        if row["status"] == "unreadable" and not inputs.folder:
            raise ValueError(f"stage.input={file}: {row['message']}")
        if row["status"] in ("unreadable", "not_media"):
            log.warning("predict: %s skipped: %s", name, row["message"])
        elif row["status"] == "no_face":
            log.warning("predict: %s: %s", name, row["message"])
        else:
            log.info("predict: %s: P(fake) %.4f → %s (threshold %.4f)", name, row["score"], row["decision"],
                     threshold.value)  # fmt: skip
        rows.append(row)
    bar.close()

    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    result = {
        "input": str(inputs.root if inputs.folder else inputs.items[0][0]),
        "model": {"spec": spec, "label": label, "checkpoint": str(path), "kind": card.get("kind", "unknown")},
        "threshold": {"value": threshold.value, "stored": threshold.stored, "source": threshold.source},
        "settings": {
            "frames": frames,
            "reduce": reduce,
            "size": int(st.size),
            "margin": float(st.margin),
            "detector": cropper.detector.name,
            "detector_options": plain(st.detector_options) or {},
        },
        "counts": counts,
        "items": rows,
    }
    write_outputs(out, result)
    log.info("predict: %d file(s) %s; predictions in %s", len(rows), counts, out / "predictions.json")
    return result


def list_inputs(
    path: Path, video_extensions: Sequence[str], image_extensions: Sequence[str], exclude: Path | None = None
) -> Inputs:
    """The files ``path`` names (itself, or every file under a folder, sorted) with their kind.

    A single file that is neither a video nor an image is refused; in a folder such files are kept as ``other``
    so that the output reports them. What predict itself writes into ``exclude`` (the output folder, when it lies in
    the input) is not read, and that is logged: a re-run must not score its own annotated frames.
    """
    videos, images = {e.lower() for e in video_extensions}, {e.lower() for e in image_extensions}

    def kind(p: Path) -> str:
        suffix = p.suffix.lower()
        return "video" if suffix in videos else "image" if suffix in images else "other"

    path = path.absolute()
    if path.is_file():
        if kind(path) == "other":
            raise ValueError(f"stage.input={path}: not a video ({sorted(videos)}) or image ({sorted(images)}) by its "
                             "extension (stage.video_extensions / stage.image_extensions)")  # fmt: skip
        return Inputs(path.parent, [(path, kind(path))], folder=False)
    if not path.is_dir():
        raise FileNotFoundError(f"stage.input={path} does not exist; give a video, an image or a folder of them")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if exclude is not None:
        out = exclude.absolute()
        ours = {p for p in files if (p.parent == out and p.name in OUTPUT_FILES) or p.is_relative_to(out / "annotated")}
        if ours:
            log.info("predict: not reading the %d file(s) a previous stage=predict wrote in %s", len(ours), out)
        files = [p for p in files if p not in ours]
    if not files:
        raise FileNotFoundError(f"stage.input={path} is an empty folder; give a video, an image or a folder of them")
    return Inputs(path, [(p, kind(p)) for p in files], folder=True)


def open_checkpoint(path: Path) -> Checkpoint:
    """The detector checkpoint at ``path``, refused unless it is a safetensors file.

    Pickles (``torch.save``, ``.pt``/``.pth``/``.ckpt``/``.bin``, TorchScript archives) can only be loaded by running
    code they contain; r2m_lab never does that, so they are named as such and refused before anything is read.
    """
    with open(path, "rb") as fh:
        head = fh.read(9)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04"):
        what = "a zip archive (torch.save or TorchScript)"
    elif head[:1] == b"\x80":
        what = "a Python pickle"
    elif len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return Checkpoint(path)
    else:
        what = "not a safetensors file"
    raise ValueError(
        f"{path} is {what}. Loading a pickled checkpoint runs code stored in it, which r2m_lab refuses; checkpoints "
        "here are safetensors (stage=finetune / stage=merge write them). Convert a file you trust knowingly (its "
        "tensors saved with safetensors.torch.save_file as backbone.* / head.*), or give a .safetensors checkpoint."
    )


def decision_threshold(given: Any, card: Mapping[str, Any], path: Path) -> Threshold:
    """``stage.threshold`` when given, else the card's stored threshold, else 0.5 flagged as not stored."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (int, float)) or not math.isfinite(float(given)):
            raise ValueError(f"stage.threshold={given!r}; give a number (P(fake) >= it is called fake) or null")
        return Threshold(float(given), False, f"given: stage.threshold={float(given)}")
    stored = card.get("threshold")
    if isinstance(stored, (int, float)) and not isinstance(stored, bool) and math.isfinite(float(stored)):
        mode = card.get("threshold_mode", "mode not recorded")
        return Threshold(float(stored), True, f"stored with the checkpoint ({card_path(path).name}: {mode})")
    why = "its card has none" if card else f"no card ({card_path(path).name}) beside it"
    return Threshold(
        0.5,
        False,
        f"no threshold stored with {path.name} ({why}; merged checkpoints carry none): 0.5 used, not a fitted "
        "threshold; give stage.threshold=<number> to choose one",
    )


class FrameScorer:
    """P(fake) of face crops with one model: the crops go through evaluation's dataset, loader and scorer."""

    def __init__(self, model: Detector, transform: Any, device: torch.device, batch_size: int) -> None:
        self.model, self.transform, self.device, self.batch_size = model, transform, device, batch_size

    def __call__(self, crops_rgb: Sequence[np.ndarray]) -> np.ndarray:
        """(N,) float64 P(fake) of N (size, size, 3) uint8 RGB crops."""
        n = len(crops_rgb)
        frames = FrameSet("predict", np.zeros(n, np.int64), np.array(["x"] * n), images=np.stack(crops_rgb))
        return score_frames(self.model, eval_loader(FrameDataset(frames, self.transform), self.batch_size), self.device)


def predict_file(
    path: Path,
    name: str,
    kind: str,
    n_frames: int,
    reduce: str,
    cropper: FaceCropper,
    scorer: FrameScorer,
    threshold: Threshold,
    annotate_dir: Path | None,
) -> dict[str, Any]:
    """One file's output row (``status``: scored | no_face | unreadable | not_media), with a row per sampled frame."""
    row: dict[str, Any] = {
        "input": name,
        "kind": kind,
        "status": "scored",
        "score": None,
        "decision": None,
        "threshold": threshold.value,
        "threshold_stored": threshold.stored,
        "frame_count": None,
        "frames": [],
        "message": "",
    }
    if kind == "other":
        return {**row, "status": "not_media", "message": f"not a video or image (extension {path.suffix!r})"}
    if kind == "image":
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # (H, W, 3) BGR, None when it does not decode
        if image is None:
            return {**row, "status": "unreadable", "message": "OpenCV cannot read it as an image"}
        count, wanted, decoded = 1, [0], {0: image}
    else:
        try:
            count, wanted, decoded = read_sampled_frames(str(path), n_frames)
        except CorruptVideo as bad:
            return {**row, "status": "unreadable", "message": f"not a readable video: {bad.reason}"}
    row["frame_count"] = count

    frame_rows, faces, crops = [], {}, []
    for i in wanted:
        if i not in decoded:
            frame_rows.append({"frame": i, "status": "unreadable", "box": None, "score": None, "decision": None})
            continue
        face = cropper.find(decoded[i])
        if face is None:
            frame_rows.append({"frame": i, "status": "no_face", "box": None, "score": None, "decision": None})
            continue
        crop, _ = cropper.crop(decoded[i], face)  # (size, size, 3) BGR, as preprocessing writes it
        faces[i] = face
        crops.append(cv2.cvtColor(crop, cv2.COLOR_BGR2RGB))  # what training reads back from the PNG
        box = [round(float(v), 2) for v in face.box]
        frame_rows.append({"frame": i, "status": "scored", "box": box, "score": None, "decision": None})
    scored = [r for r in frame_rows if r["status"] == "scored"]
    if scored:
        scores = scorer(crops)  # (F,) in the order of `scored`
        for r, s in zip(scored, scores.tolist(), strict=True):
            r["score"], r["decision"] = s, decide(s, threshold)
        # The video's score as evaluation aggregates frames: one video id, labels unused (all 0).
        agg, _, _ = video_scores(scores, np.zeros(len(scores), np.int64), ["video"] * len(scores), reduce)
        row["score"] = float(agg[0])
        row["decision"] = decide(row["score"], threshold)
    else:
        row["status"] = "no_face"
        row["message"] = f"no face detected in any of the {len(wanted)} sampled frame(s): not scored"
    counts = {s: sum(r["status"] == s for r in frame_rows) for s in ("scored", "no_face", "unreadable")}
    row.update(
        frames=frame_rows,
        frames_sampled=len(wanted),
        frames_scored=counts["scored"],
        frames_no_face=counts["no_face"],
        frames_unreadable=counts["unreadable"],
    )
    if annotate_dir is not None:
        row["annotated"] = str(annotate(annotate_dir / safe_name(name), decoded, frame_rows, faces, threshold))
    return row


def decide(score: float, threshold: Threshold) -> str:
    """``fake`` when ``score >= threshold`` (evaluation's rule), else ``real``."""
    return "fake" if score >= threshold.value else "real"


def safe_name(name: str) -> str:
    """A file's output name as one folder name (``a/b.mp4`` → ``a__b.mp4``)."""
    return name.replace("/", "__").replace("\\", "__")


def annotate(
    folder: Path,
    decoded: Mapping[int, np.ndarray],
    frame_rows: Sequence[Mapping[str, Any]],
    faces: Mapping[int, Face],
    threshold: Threshold,
) -> Path:
    """Each decoded sampled frame as ``<folder>/<frame index>.png`` with the face box and its P(fake) drawn (red:
    called fake, green: real; a frame without a face says so). Returns ``folder``."""
    width = max(3, len(str(max(decoded))))
    for r in frame_rows:
        i = r["frame"]
        if i not in decoded:
            continue
        image = decoded[i].copy()  # (H, W, 3) BGR
        font = max(0.4, min(image.shape[:2]) / 800)  # legible on a 160² clip and on 1080p alike
        line = max(1, int(round(2 * font)))
        if r["status"] == "scored":
            colour = (0, 0, 255) if r["decision"] == "fake" else (0, 200, 0)
            x0, y0, x1, y1 = (int(round(v)) for v in faces[i].box)
            cv2.rectangle(image, (x0, y0), (x1, y1), colour, line)
            text = f"P(fake) {r['score']:.3f} {r['decision']}"
            (text_w, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
            origin = (max(0, min(x0, image.shape[1] - text_w)), max(int(24 * font), y0 - 4))  # kept inside the frame
        else:
            colour, text, origin = (0, 200, 255), "no face", (4, int(24 * font))
        cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font, colour, 1, cv2.LINE_AA)
        ok, png = cv2.imencode(".png", image)
        if not ok:
            raise OSError(f"OpenCV could not encode annotated frame {i} as PNG")
        write_bytes_atomic(folder / f"{i:0{width}d}.png", png.tobytes())
    return folder


def write_outputs(out: Path, result: Mapping[str, Any]) -> None:
    """predictions.json (everything), predictions.csv (one row per file), predictions_frames.csv (per frame)."""
    write_json_atomic(out / "predictions.json", result)
    write_text_atomic(out / "predictions.csv", _csv(ITEM_COLUMNS, result["items"]))
    frames = []
    for item in result["items"]:
        for r in item["frames"]:
            box = r["box"] or [None] * 4
            frames.append({"input": item["input"], **r, **dict(zip(("x0", "y0", "x1", "y1"), box, strict=True))})
    write_text_atomic(out / "predictions_frames.csv", _csv(FRAME_COLUMNS, frames))


def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()
