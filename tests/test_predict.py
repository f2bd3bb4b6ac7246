"""stage=predict with a randomly initialised tiny detector (saved as a specialist and as a merge) on short videos
made from scikit-image's astronaut (a real face), an image of her, and a folder with a corrupt and a faceless file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from r2m_lab.backbones import create_backbone
from r2m_lab.data.faces import HaarDetector, largest
from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import merged_path, specialist_path
from r2m_lab.stages.config_nodes import plain
from r2m_lab.weights import save_detector, write_card
from tests.conftest import compose_config
from tests.test_preprocess import N_FRAMES, write_video

SPECIALIST = "synthetic_swap"


def save_random_detector(path: Path, cfg, card: dict) -> None:
    """A tiny ViT of ``cfg.backbone`` at random init, its head scaled up so that P(fake) varies between crops."""
    torch.manual_seed(0)
    backbone = create_backbone(plain(cfg.backbone), load_weights=False)
    head = torch.nn.Linear(backbone.num_features, 2)
    with torch.no_grad():
        head.weight.mul_(40.0)
    save_detector(path, backbone.state_dict(), head.state_dict(), {"kind": card["kind"], "base_hash": "x"})
    write_card(path, {"backbone": str(cfg.backbone.name), **card})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A root with a specialist (threshold stored in its card) and a merge (none), and the test inputs."""
    root = tmp_path_factory.mktemp("predict")
    cfg = compose_config(root)
    save_random_detector(specialist_path(cfg, SPECIALIST), cfg, {"kind": "specialist", "threshold": 0.5003,
                                                                 "threshold_mode": "eer on val"})  # fmt: skip
    save_random_detector(merged_path(cfg, cfg.merger), cfg, {"kind": "merged"})
    inputs = root / "inputs"
    write_video(inputs / "face.mp4", 0)
    write_video(inputs / "clips/other.mp4", 2)
    write_video(inputs / "grey.avi", blank=True)  # no face in any frame
    cv2.imwrite(str(inputs / "astronaut.png"), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    (inputs / "broken.mp4").write_bytes(b"\x00\x01 not a video " * 50)
    (inputs / "broken.jpg").write_bytes(b"not a jpeg")
    (inputs / "notes.txt").write_text("a file that is neither")
    return root, inputs


def run_predict(root: Path, name: str, *overrides: str) -> tuple[dict, Path]:
    out = root / name
    cfg = compose_config(root, ["stage=predict", "stage.frames=4", "stage.size=64", f"stage.output={out}", *overrides])
    return run_stage(cfg), out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_video_scores_per_frame_and_per_video_at_the_stored_threshold(setup):
    root, inputs = setup
    result, out = run_predict(root, "video", f"stage.input={inputs / 'face.mp4'}",
                              f"stage.model=specialist:{SPECIALIST}", "stage.annotate=true")  # fmt: skip
    assert json.loads((out / "predictions.json").read_text()) == json.loads(json.dumps(result))
    assert result["threshold"] == {"value": 0.5003, "stored": True,
                                   "source": f"stored with the checkpoint ({SPECIALIST}.json: eer on val)"}  # fmt: skip
    (item,) = result["items"]
    assert item["status"] == "scored" and item["frame_count"] == N_FRAMES
    assert [f["frame"] for f in item["frames"]] == [0, 3, 6, 9] and item["frames_scored"] == 4
    scores = [f["score"] for f in item["frames"]]
    assert all(0.0 <= s <= 1.0 for s in scores) and len(set(scores)) > 1  # different crops, different scores
    assert item["score"] == pytest.approx(float(np.mean(scores)), abs=1e-12)
    assert item["decision"] == ("fake" if item["score"] >= 0.5003 else "real")
    for f in item["frames"]:
        assert f["decision"] == ("fake" if f["score"] >= 0.5003 else "real")
    # the box is where Haar finds the face in the decoded frame, the crop the preprocessing crop
    cap = cv2.VideoCapture(str(inputs / "face.mp4"))
    first = cap.read()[1]
    cap.release()
    assert item["frames"][0]["box"] == [round(v, 2) for v in largest(HaarDetector().detect(first)).box]
    (row,) = read_csv(out / "predictions.csv")
    assert row["input"] == "face.mp4" and row["status"] == "scored" and row["decision"] == item["decision"]
    assert float(row["score"]) == pytest.approx(item["score"]) and row["threshold_stored"] == "True"
    frames = read_csv(out / "predictions_frames.csv")
    assert [float(r["score"]) for r in frames] == pytest.approx(scores)
    # annotated frames: one per sampled frame, the box drawn in the decision's colour
    pngs = sorted((out / "annotated" / "face.mp4").glob("*.png"))
    assert [p.name for p in pngs] == ["000.png", "003.png", "006.png", "009.png"]
    drawn = cv2.imread(str(pngs[0]))
    x0, y0 = (int(round(v)) for v in item["frames"][0]["box"][:2])
    colour = [0, 0, 255] if item["frames"][0]["decision"] == "fake" else [0, 200, 0]
    assert drawn.shape == first.shape and drawn[y0 + 5, x0].tolist() == colour
    # median / max aggregation, as evaluation's video_scores
    maxed, _ = run_predict(root, "video_max", f"stage.input={inputs / 'face.mp4'}",
                           f"stage.model=specialist:{SPECIALIST}", "stage.reduce=max")  # fmt: skip
    assert maxed["items"][0]["score"] == pytest.approx(max(scores), abs=1e-12)


def test_folder_reports_bad_files_and_faceless_videos_with_no_score(setup):
    root, inputs = setup
    result, out = run_predict(root, "folder", f"stage.input={inputs}", "stage.model=merged", "stage.annotate=true")
    by_name = {item["input"]: item for item in result["items"]}
    assert sorted(by_name) == ["astronaut.png", "broken.jpg", "broken.mp4", "clips/other.mp4", "face.mp4",
                               "grey.avi", "notes.txt"]  # fmt: skip
    assert result["counts"] == {"scored": 3, "no_face": 1, "unreadable": 2, "not_media": 1}
    # a merge stores no threshold: 0.5, and every row says it was not stored
    assert result["threshold"]["value"] == 0.5 and not result["threshold"]["stored"]
    assert "no threshold stored" in result["threshold"]["source"]
    rows = {r["input"]: r for r in read_csv(out / "predictions.csv")}
    assert {r["threshold_stored"] for r in rows.values()} == {"False"}
    for name in ("astronaut.png", "clips/other.mp4", "face.mp4"):
        item = by_name[name]
        scores = [f["score"] for f in item["frames"] if f["status"] == "scored"]
        assert item["score"] == pytest.approx(float(np.mean(scores)), abs=1e-12)
        assert item["decision"] == ("fake" if item["score"] >= 0.5 else "real") == rows[name]["decision"]
    assert by_name["astronaut.png"]["kind"] == "image" and by_name["astronaut.png"]["frames_scored"] == 1
    grey = by_name["grey.avi"]
    assert grey["status"] == "no_face" and grey["score"] is None and grey["decision"] is None
    assert grey["frames_no_face"] == 4 and "no face detected" in grey["message"]
    assert rows["grey.avi"]["score"] == "" and rows["grey.avi"]["decision"] == ""
    broken = by_name["broken.mp4"]
    assert broken["status"] == "unreadable" and "not a readable video" in broken["message"]
    assert by_name["broken.jpg"]["status"] == "unreadable" and by_name["notes.txt"]["status"] == "not_media"
    assert len(list((out / "annotated" / "clips__other.mp4").glob("*.png"))) == 4
    assert len(list((out / "annotated" / "grey.avi").glob("*.png"))) == 4  # "no face" written on each
    # an explicit threshold is used and recorded as given
    given, _ = run_predict(root, "given", f"stage.input={inputs / 'astronaut.png'}", "stage.threshold=0.0")
    assert given["threshold"] == {"value": 0.0, "stored": False, "source": "given: stage.threshold=0.0"}
    assert given["items"][0]["decision"] == "fake"
    # output written into the input folder: a re-run does not score its own annotated frames or read its CSVs
    alone = root / "alone"
    alone.mkdir()
    (alone / "astronaut.png").write_bytes((inputs / "astronaut.png").read_bytes())
    for _ in range(2):
        again, _ = run_predict(root, "alone", f"stage.input={alone}", "stage.annotate=true")
        assert [i["input"] for i in again["items"]] == ["astronaut.png"]
    assert (alone / "annotated" / "astronaut.png" / "000.png").is_file()


def test_bad_input_and_code_checkpoints_are_refused(setup, tmp_path):
    root, inputs = setup
    face = f"stage.input={inputs / 'face.mp4'}"
    pickled = tmp_path / "detector.pt"
    torch.save({"head.weight": torch.zeros(2, 4)}, pickled)
    with pytest.raises(ValueError, match="is a zip archive .*runs code stored in it, which r2m_lab refuses"):
        run_predict(root, "x", face, f"stage.model={pickled}")
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="is a Python pickle"):
        run_predict(root, "x", face, f"stage.model={legacy}")
    with pytest.raises(FileNotFoundError, match="No checkpoint for model='specialist:nothing'"):
        run_predict(root, "x", face, "stage.model=specialist:nothing")
    with pytest.raises(ValueError, match="stage.model=ensemble is several checkpoints"):
        run_predict(root, "x", face, "stage.model=ensemble")
    with pytest.raises(ValueError, match="stage=predict needs stage.input"):
        run_predict(root, "x")
    with pytest.raises(ValueError, match=r"notes.txt: not a video .* or image"):
        run_predict(root, "x", f"stage.input={inputs / 'notes.txt'}")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        run_predict(root, "x", f"stage.input={inputs / 'nowhere'}")
    with pytest.raises(ValueError, match="stage.reduce='mode'"):
        run_predict(root, "x", face, "stage.reduce=mode")
    with pytest.raises(ValueError, match="stage.threshold='high'"):
        run_predict(root, "x", face, "stage.threshold=high")
    # given alone (not in a folder), a file that does not decode is an error naming it
    with pytest.raises(ValueError, match="broken.mp4: not a readable video: OpenCV cannot open it"):
        run_predict(root, "x", f"stage.input={inputs / 'broken.mp4'}")
