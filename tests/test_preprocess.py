"""stage=preprocess on miniature FF++-, Celeb-DF- and folder-shaped trees of short videos written with OpenCV from
scikit-image's astronaut (a real face), moved and scaled per frame so the true face centre of every frame is known."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from r2m_lab.data import faces
from r2m_lab.data.index import read_index
from r2m_lab.data.preprocess import (
    MANIFEST,
    CelebDFLayout,
    CropSettings,
    FFPPLayout,
    FolderLayout,
    hash_split,
    plan,
    sample_indices,
)
from r2m_lab.data.sources import DeepfakeBenchSource
from r2m_lab.stages import run_stage
from tests.conftest import compose_config

N_FRAMES, SIDE = 10, 160  # per test video; Haar finds the ~50-pixel astronaut face at this size (checked below)
FACE_CENTRE = (224.5, 113.5)  # the astronaut's face centre in the 512² photo (OpenCV's Haar box 177, 66, 95, 95)


def face_centre(video: int, i: int) -> tuple[float, float]:
    """Where frame ``i`` of test video ``video`` puts the face centre (pixels of the SIDE² frame)."""
    return 70 + 2.5 * i, 65 + 1.5 * i + 4 * video


def write_video(path: Path, video: int = 0, blank: bool = False, n: int = N_FRAMES) -> Path:
    """An mp4v .mp4 of ``n`` SIDE² frames: the astronaut scaled by 0.5-0.66 and moving, or a flat grey frame."""
    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (SIDE, SIDE))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for i in range(n):
        if blank:
            frame = np.full((SIDE, SIDE, 3), 128, np.uint8)
        else:
            s = 0.5 + 0.015 * i + 0.03 * video
            cx, cy = face_centre(video, i)
            m = np.float32([[s, 0, cx - s * FACE_CENTRE[0]], [0, s, cy - s * FACE_CENTRE[1]]])
            frame = cv2.warpAffine(photo, m, (SIDE, SIDE), borderMode=cv2.BORDER_REFLECT)
        writer.write(frame)
    writer.release()
    return path


def ffpp_tree(root: Path) -> dict[str, int]:
    """Reals 000-005, Deepfakes fakes 000_001, 002_003, 004_005, a blank real 777, a garbage fake 008_009."""
    movement = {}
    real = root / "original_sequences/youtube/c23/videos"
    fake = root / "manipulated_sequences/Deepfakes/c23/videos"
    for v in range(6):
        write_video(real / f"{v:03d}.mp4", v % 3)
        movement[f"{v:03d}"] = v % 3
    for v, name in enumerate(["000_001", "002_003", "004_005"]):
        write_video(fake / f"{name}.mp4", v)
        movement[name] = v
    write_video(real / "777.mp4", blank=True)
    (fake / "008_009.mp4").write_bytes(b"\x00\x01 this is not a video " * 64)
    return movement


def official_splits(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pairs = {
        "train": [["000", "001"], ["777", "776"], ["008", "009"]],
        "val": [["002", "003"]],
        "test": [["004", "005"]],
    }
    for split, listed in pairs.items():
        (folder / f"{split}.json").write_text(json.dumps(listed))
    return folder


def celebdf_tree(root: Path) -> None:
    write_video(root / "Celeb-real/id0_0000.mp4", 0)
    write_video(root / "YouTube-real/00000.mp4", 1)
    write_video(root / "Celeb-synthesis/id0_id1_0000.mp4", 2)
    write_video(root / "Celeb-synthesis/id1_id0_0001.mp4", 1)
    (root / "List_of_testing_videos.txt").write_text("1 YouTube-real/00000.mp4\n0 Celeb-synthesis/id1_id0_0001.mp4\n")


def preprocess_cfg(root: Path, *overrides: str):
    return compose_config(root, ["stage=preprocess", "stage.frames_per_video=4", "stage.size=64", *overrides])


def tree_bytes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def ffpp(tmp_path_factory):
    """The FF++ tree preprocessed once (official splits, haar, 4 frames of 64²); tests only read it."""
    root = tmp_path_factory.mktemp("ffpp")
    movement = ffpp_tree(root / "raw")
    cfg = preprocess_cfg(
        root,
        f"stage.input={root / 'raw'}",
        "layout=ffpp",
        f"layout.split_dir={official_splits(root / 'splits')}",
        "stage.workers=0",
    )
    summary = run_stage(cfg)
    return root, root / "data", summary, movement


def test_ffpp_crops_follow_the_face_and_the_index_validates(ffpp):
    root, out, summary, movement = ffpp
    wanted = sample_indices(N_FRAMES, 4)
    assert wanted == [0, 3, 6, 9]
    index = read_index(out / "dataset_json" / "FF-DF.json", "FF-DF")
    assert set(index) == {"FF-real", "FF-DF"}
    assert set(index["FF-real"]["train"]["c23"]) == {"000", "001"} and set(index["FF-DF"]["test"]["c23"]) == {"004_005"}
    joint = read_index(out / "dataset_json" / "FaceForensics++.json", "FaceForensics++")
    assert joint["FF-real"] == index["FF-real"]  # the real crops are made once and filed in both indexes
    detector = faces.HaarDetector()
    for label, splits in index.items():
        for levels in splits.values():
            for video, record in levels["c23"].items():
                assert len(record["frames"]) == 4, (label, video)
                manifest = json.loads((out / Path(record["frames"][0]).parent / MANIFEST).read_text())
                assert manifest["sampled"] == wanted and manifest["no_face"] == []
                for rel, i in zip(record["frames"], wanted, strict=True):
                    assert not Path(rel).is_absolute() and rel.endswith(f"/frames/{video}/{i:03d}.png")
                    crop = cv2.imread(str(out / rel))
                    assert crop.shape == (64, 64, 3)
                    # the detected box sits on the face we put there (to a few pixels, after mp4v compression) ...
                    box = manifest["boxes"][str(i)]
                    cx, cy = face_centre(movement[video], i)
                    assert abs((box[0] + box[2]) / 2 - cx) < 4 and abs((box[1] + box[3]) / 2 - cy) < 4, (video, i)
                    # ... and the crop holds it, centred, at the margin's scale (face side ≈ 64 / 1.3)
                    found = faces.largest(detector.detect(cv2.resize(crop, (128, 128))))
                    assert found is not None, (video, i)
                    assert abs(found.centre[0] - 64) < 10 and abs(found.centre[1] - 64) < 10
                    assert 0.55 < (found.box[2] - found.box[0]) / (128 / 1.3) < 1.4


def test_corrupt_and_faceless_videos_are_reported_not_fatal(ffpp):
    root, out, summary, _ = ffpp
    cov = json.loads((out / "dataset_json" / "FF-DF.coverage.json").read_text())
    assert cov == summary["datasets"]["FF-DF"]
    (corrupt,) = cov["problems"]["corrupt"]
    assert corrupt["video"] == "manipulated_sequences/Deepfakes/c23/videos/008_009.mp4"
    assert cov["problems"]["faceless"] == ["original_sequences/youtube/c23/videos/777.mp4"]
    assert cov["problems"]["no_face"] == [
        {"video": "original_sequences/youtube/c23/videos/777.mp4", "frames": [0, 3, 6, 9]}
    ]
    real, fake = cov["rows"]["FF-real"], cov["rows"]["FF-DF"]
    assert (real["videos"], real["indexed"], real["faceless_videos"], real["no_face_frames"]) == (7, 6, 1, 4)
    assert (real["frames_read"], real["faces"], real["frames_indexed"]) == (28, 24, 24)
    assert (fake["videos"], fake["indexed"], fake["corrupt"], fake["faces"]) == (4, 3, 1, 12)
    # 777 is in a split file but has no face: its manifest records that, the index leaves it out
    assert "777" not in read_index(out / "dataset_json" / "FF-DF.json", "FF-DF")["FF-real"]["train"]["c23"]
    assert json.loads((out / "FaceForensics++/original_sequences/youtube/c23/frames/777" / MANIFEST).read_text())[
        "no_face"
    ] == [0, 3, 6, 9]


def test_rerun_skips_finished_videos_and_gives_identical_bytes(tmp_path):
    ffpp_tree(tmp_path / "raw")
    args = [f"stage.input={tmp_path / 'raw'}", "layout=ffpp", "stage.workers=0", "stage.progress=false"]
    first = run_stage(preprocess_cfg(tmp_path, *args))
    before = tree_bytes(tmp_path / "data")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.png")}
    second = run_stage(preprocess_cfg(tmp_path, *args))
    assert (
        first["resumed"] == 0 and second["resumed"] == 10
    )  # every decodable video (the blank one too); the corrupt one is retried
    assert tree_bytes(tmp_path / "data") == before
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items()), "a finished video was written again"
    assert {s["state"] for s in second["indexes"].values()} == {"unchanged"}
    # a crash mid-video: the unfinished folder (marker, no manifest) is redone, the rest is skipped
    folder = tmp_path / "data/FaceForensics++/original_sequences/youtube/c23/frames/000"
    (folder / MANIFEST).unlink()
    (folder / ".preprocess-in-progress").write_bytes(b"")
    (folder / "003.png").unlink()
    third = run_stage(preprocess_cfg(tmp_path, *args))
    assert third["resumed"] == 9 and tree_bytes(tmp_path / "data") == before


def test_nothing_prepared_is_overwritten_without_overwrite(tmp_path):
    raw = tmp_path / "raw"
    write_video(raw / "a.mp4", 0)
    args = [
        f"stage.input={raw}",
        "layout.dataset=Mine",
        "layout.label=Mine_real",
        "layout.label_value=0",
        "stage.workers=0",
    ]
    index = tmp_path / "data/dataset_json/Mine.json"
    index.parent.mkdir(parents=True)
    index.write_text('{"Mine": {"Mine_real": {"test": {}}}}')  # someone's prepared index
    with pytest.raises(FileExistsError, match="Mine.json already exists.*stage.overwrite=true"):
        run_stage(preprocess_cfg(tmp_path, *args))
    assert index.read_text() == '{"Mine": {"Mine_real": {"test": {}}}}'
    run_stage(preprocess_cfg(tmp_path, *args, "stage.overwrite=true"))
    assert read_index(index, "Mine")
    # other crop settings over finished folders: refused up front (index, then frames), nothing touched
    before = tree_bytes(tmp_path / "data")
    with pytest.raises(FileExistsError, match="not written by this preprocess config"):
        run_stage(preprocess_cfg(tmp_path, *args, "stage.size=48"))
    assert tree_bytes(tmp_path / "data") == before
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "data", copy)
    shutil.rmtree(copy / "dataset_json")  # no index left to object: the frames folders still do
    with pytest.raises(FileExistsError, match="frames folders already hold other crops.*other settings"):
        run_stage(preprocess_cfg(tmp_path, *args, "stage.size=48", f"stage.output={copy}"))
    # frames someone else put there (no manifest, no in-progress marker) are theirs
    foreign = tmp_path / "other"
    (foreign / "Mine/Mine_real/frames/a").mkdir(parents=True)
    (foreign / "Mine/Mine_real/frames/a/000.png").write_bytes(b"theirs")
    with pytest.raises(FileExistsError, match="not written here"):
        run_stage(preprocess_cfg(tmp_path, *args, f"stage.output={foreign}"))


def test_celebdf_layout_test_list_labels_and_parallel_workers(tmp_path):
    celebdf_tree(tmp_path / "raw")
    args = [f"stage.input={tmp_path / 'raw'}", "layout=celebdf"]
    run_stage(preprocess_cfg(tmp_path, *args, "stage.workers=2", f"stage.output={tmp_path / 'par'}"))
    run_stage(preprocess_cfg(tmp_path, *args, "stage.workers=0", f"stage.output={tmp_path / 'seq'}"))
    assert tree_bytes(tmp_path / "par") == tree_bytes(tmp_path / "seq")  # workers change nothing but the speed
    index = read_index(tmp_path / "seq/dataset_json/Celeb-DF-v2.json", "Celeb-DF-v2")
    assert set(index) == {"CelebDFv2_real", "CelebDFv2_fake"}
    assert set(index["CelebDFv2_real"]["test"]) == {"00000"} and set(index["CelebDFv2_fake"]["test"]) == {
        "id1_id0_0001"
    }
    non_test = {v for lab in index.values() for s, vids in lab.items() if s != "test" for v in vids}
    assert non_test == {"id0_0000", "id0_id1_0000"}
    rel = index["CelebDFv2_real"]["test"]["00000"]["frames"][0]
    assert rel == "Celeb-DF-v2/YouTube-real/frames/00000/000.png" and (tmp_path / "seq" / rel).is_file()


def test_folder_layout_centre_policy_marks_faceless_frames(tmp_path):
    raw = tmp_path / "raw"
    write_video(raw / "clips/face.mp4", 0)
    write_video(raw / "blank.avi", blank=True)
    summary = run_stage(preprocess_cfg(tmp_path, f"stage.input={raw}", "layout.dataset=Mine", "layout.label=Mine_fake",
                                       "layout.label_value=1", "layout.split=test", "stage.no_face=centre",
                                       "stage.workers=0"))  # fmt: skip
    index = read_index(tmp_path / "data/dataset_json/Mine.json", "Mine")
    assert set(index["Mine_fake"]["test"]) == {"clips_face", "blank"}
    assert len(index["Mine_fake"]["test"]["blank"]["frames"]) == 4  # centre crops, indexed and marked
    row = summary["datasets"]["Mine"]["rows"]["Mine_fake"]
    assert (row["centre_crops"], row["no_face_frames"], row["faces"], row["faceless_videos"]) == (4, 4, 4, 1)
    assert summary["datasets"]["Mine"]["labels"] == {"Mine_fake": 1}


def test_bad_input_names_the_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; expected a FaceForensics\+\+ tree"):
        plan(FFPPLayout(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="original_sequences/youtube/c23/videos.*layout.compression=c23"):
        plan(FFPPLayout(), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="Celeb-real.*expected a Celeb-DF tree"):
        plan(CelebDFLayout(), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="empty holds no videos; expected a folder of videos"):
        plan(FolderLayout("Mine", "Mine_real", 0), tmp_path / "empty")
    # a layout's knobs are checked when its config entry is instantiated, naming the knob
    with pytest.raises(ValueError, match="layout=folder needs layout.dataset"):
        run_stage(preprocess_cfg(tmp_path, f"stage.input={tmp_path / 'empty'}"))
    with pytest.raises(ValueError, match=r"layout.methods: unknown FF\+\+ method 'Deepfake'"):
        run_stage(preprocess_cfg(tmp_path, f"stage.input={tmp_path}", "layout=ffpp", "layout.methods=[Deepfake]"))
    with pytest.raises(ValueError, match="layout.dataset='Mine'.*layout.real_label"):
        run_stage(preprocess_cfg(tmp_path, f"stage.input={tmp_path}", "layout=celebdf", "layout.dataset=Mine"))
    with pytest.raises(ValueError, match="stage=preprocess needs stage.input"):
        run_stage(preprocess_cfg(tmp_path))
    with pytest.raises(ValueError, match="stage.no_face='drop'"):
        CropSettings(no_face="drop")


def test_hash_split_is_fixed_and_follows_the_ratios():
    ratios = {"train": 0.7, "val": 0.1, "test": 0.2}
    splits = [hash_split(f"video{i}", ratios) for i in range(2000)]
    assert splits == [hash_split(f"video{i}", ratios) for i in range(2000)]
    for split, share in ratios.items():
        assert abs(splits.count(split) / 2000 - share) < 0.03
    assert hash_split("x", {"train": 0.0, "val": 0.0, "test": 1.0}) == "test"


def test_alignment_maps_landmarks_onto_the_template():
    """Synthetic landmarks: the template moved by a known similarity; alignment must undo it exactly."""
    size, margin = 64, 1.3
    target = ((faces.TEMPLATE_112 / 112 - 0.5) / margin + 0.5) * size  # where the five points must land
    angle, scale, shift = np.deg2rad(25), 2.5, np.array([60.0, -80.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = faces.TEMPLATE_112 @ rot.T + shift  # (5, 2) in a 300² frame
    m = faces.alignment_matrix(landmarks, margin, size)
    mapped = landmarks @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(mapped, target, atol=1e-6)
    # the warped image puts a dot drawn at each landmark on its template position
    image = np.zeros((300, 300, 3), np.uint8)
    for x, y in landmarks:
        cv2.circle(image, (int(round(x)), int(round(y))), 14, (255, 255, 255), -1)  # ≈ 2.5 px once warped
    crop, aligned = faces.crop_face(image, faces.Face((0, 0, 300, 300), 1.0, landmarks), margin, size)
    assert aligned and crop.shape == (size, size, 3)
    for x, y in target:
        assert crop[int(round(y)), int(round(x))].max() > 100
    with pytest.raises(ValueError, match=r"\(5, 2\) finite landmarks"):
        faces.alignment_matrix(np.zeros((4, 2)), margin, size)


def test_detector_choice_is_explicit():
    installed = faces.installed_detectors()
    assert installed[-1] == "haar"
    assert faces.resolve_detector_name("auto") == installed[0]
    with pytest.raises(ValueError, match="stage.detector='yolo'"):
        faces.resolve_detector_name("yolo")
    for name, (_, package, _) in faces.DETECTORS.items():
        if name not in installed:  # asked for by name and absent: the install line, never a quiet Haar
            with pytest.raises(ImportError, match=f"pip install {package}"):
                faces.make_face_detector(name)
    box = faces.largest([faces.Face((0, 0, 10, 10)), faces.Face((5, 5, 40, 30)), faces.Face((0, 0, 20, 20))])
    assert box.box == (5, 5, 40, 30)


def test_preprocess_then_finetune_and_evaluate(ffpp, tmp_path):
    """The preprocessed FF++ tree and a Celeb-DF tree, read by DeepfakeBenchSource, train and score a specialist."""
    _, ffpp_data, _, _ = ffpp
    data = tmp_path / "data"
    shutil.copytree(ffpp_data, data)
    celebdf_tree(tmp_path / "celebdf")
    run_stage(preprocess_cfg(tmp_path, f"stage.input={tmp_path / 'celebdf'}", "layout=celebdf",
                             "stage.workers=0", f"stage.output={data}"))  # fmt: skip
    src = DeepfakeBenchSource("x", "FF-DF", str(data / "dataset_json/FF-DF.json"), str(data), ["FF-real"], ["FF-DF"])
    train = src.frames("train")
    assert len(train) == 3 * 4 and src.reports["train"]["missing_frames"] == 0  # 000, 001, 000_001
    assert train.image(0).shape == (64, 64, 3)
    bench = [
        "benchmark=ffpp",
        *(f"~benchmark.protocols.in_distribution.{k}" for k in ("f2f", "fs", "nt")),
        *(f"~benchmark.protocols.cross_dataset.{k}" for k in ("dfd", "dfdc", "dfdcp")),
        f"paths.data_dir={data}",
    ]
    card = run_stage(compose_config(tmp_path, ["stage=finetune", "data=faceforensics_df", *bench]))
    assert card["train_frames"] > 0
    report = run_stage(compose_config(tmp_path, ["stage=evaluate", "stage.model=specialist:faceforensics_df",
                                                 f"paths.output_dir={tmp_path}/eval", *bench]))  # fmt: skip
    (label,) = report["models"]
    tests = report["models"][label]["test"]
    assert set(tests) == {"in_distribution/df", "cross_dataset/celebdf_v2"}
    for metrics in tests.values():
        assert 0.0 <= metrics["frame"]["auc"] <= 1.0


def test_every_layout_entry_names_its_planner():
    """conf/layout/<name>.yaml builds the planner whose name it is; an unknown knob is refused, naming the layout."""
    from r2m_lab.data.preprocess import Layout
    from r2m_lab.stages.preprocess import build_layout

    entries = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "layout").glob("*.yaml"))
    assert entries == ["celebdf", "ffpp", "folder"]
    required = {"folder": ["layout.dataset=D", "layout.label=D_real", "layout.label_value=0"]}
    for name in entries:
        cfg = compose_config(Path("/nonexistent"), ["stage=preprocess", f"layout={name}", *required.get(name, [])])
        layout = build_layout(cfg.layout)
        assert isinstance(layout, Layout) and layout.name == name
    cfg = compose_config(Path("/nonexistent"), ["stage=preprocess", "layout=ffpp", "+layout.level=c40"])
    with pytest.raises(TypeError, match="layout=ffpp: knobs .*level.* do not fit"):
        build_layout(cfg.layout)
