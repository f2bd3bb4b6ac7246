"""Frame sources, frame identity, balanced sampling, and the DeepfakeBench index reader on a tree made here."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from r2m_lab.data.loaders import balanced_sampler
from r2m_lab.data.sources import DeepfakeBenchSource, FrameSet, frame_keys


def test_frame_keys_number_frames_within_videos():
    keys = frame_keys(np.array(["a", "a", "b", "a"]))
    assert keys.tolist() == ["a#0", "a#1", "b#0", "a#2"]


def test_subset_and_concat_keep_alignment():
    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    fs = FrameSet("x", np.array([0, 1, 1, 0]), np.array(["r0", "f0", "f0", "r1"]), images=images)
    sub = fs.subset(np.array([2, 0]))
    assert sub.labels.tolist() == [1, 0] and sub.keys.tolist() == ["f0#1", "r0#0"]
    assert np.array_equal(sub.image(0), images[2])
    both = FrameSet.concat("y", [fs, sub])
    assert len(both) == 6 and both.keys.tolist()[4:] == ["f0#1", "r0#0"]
    with pytest.raises(ValueError, match="exactly one"):
        FrameSet("bad", np.zeros(1), np.array(["a"]))


def test_balanced_sampler_draws_both_classes_equally():
    labels = np.array([0] * 90 + [1] * 10)
    draws = np.array(list(balanced_sampler(labels, 4000, seed=0)))
    assert abs(labels[draws].mean() - 0.5) < 0.05
    with pytest.raises(ValueError, match="0 fake"):
        balanced_sampler(np.zeros(5, dtype=int), 10, 0)


def write_dfb_tree(root):
    """A DeepfakeBench-shaped dataset: FF-DF with c23, Windows separators in the index, 4 frames per video."""
    index = {"FF-DF": {}}
    for label, y in (("FF-real", 0), ("FF-DF", 1)):
        index["FF-DF"][label] = {}
        for split in ("train", "val", "test"):
            videos = {}
            for v in range(2):
                name = f"{split}{v:03d}"
                frames = []
                for j in range(4):
                    rel = f"FaceForensics++\\{label}\\frames\\{name}\\{j:03d}.png"
                    path = root.joinpath(*rel.split("\\"))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(path), np.full((8, 8, 3), 40 * y + j, np.uint8))
                    frames.append(rel)
                videos[name] = {"label": label, "frames": frames}
            index["FF-DF"][label][split] = {"c23": videos}
    (root / "dataset_json").mkdir()
    (root / "dataset_json" / "FF-DF.json").write_text(json.dumps(index))


def test_deepfakebench_reader(tmp_path):
    write_dfb_tree(tmp_path)
    src = DeepfakeBenchSource(
        "faceforensics_df",
        "FF-DF",
        str(tmp_path / "dataset_json/FF-DF.json"),
        str(tmp_path),
        ["FF-real"],
        ["FF-DF"],
        frames_per_video=2,
    )
    train, test = src.frames("train"), src.frames("test")
    assert len(train) == 2 * 2 * 2 and len(test) == 2 * 2 * 4  # evenly spaced 2 of 4 for training, all for testing
    assert train.labels.sum() == 4 and set(train.video_ids) == {
        f"FF-DF/{lab}/train{v:03d}" for lab in ("FF-real", "FF-DF") for v in range(2)
    }
    # evenly spaced means first and last frame, not the first two
    assert [p[-7:] for p in train.paths[:2]] == ["000.png", "003.png"]
    assert train.image(len(train) - 1)[0, 0].tolist() == [43, 43, 43]


def test_deepfakebench_reader_refuses_unknown_labels_and_missing_index(tmp_path):
    write_dfb_tree(tmp_path)
    src = DeepfakeBenchSource("x", "FF-DF", str(tmp_path / "dataset_json/FF-DF.json"), str(tmp_path), ["FF-real"], [])
    with pytest.raises(ValueError, match="FF-DF/FF-DF"):
        src.frames("train")
    missing = DeepfakeBenchSource("x", "FF-DF", str(tmp_path / "nope.json"), str(tmp_path), [], [], how_to_get="ask")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        missing.frames("test")


def test_dataloader_workers_draw_different_augmentations():
    import albumentations as A
    import torch

    from r2m_lab.data.loaders import FrameDataset, build_transform, seed_worker_transform

    # 16 copies of one image; horizontal flips are the only randomness, so each output reveals one coin toss.
    image = np.tile(np.arange(8, dtype=np.uint8)[None, :, None], (8, 1, 3))
    frames = FrameSet(
        "x", np.zeros(16, dtype=np.int64), np.array([f"v{i}" for i in range(16)]), images=image[None].repeat(16, 0)
    )
    inputs = {"input_size": 8, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    dataset = FrameDataset(frames, build_transform(inputs, [A.HorizontalFlip(p=0.5)], seed=3))
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, worker_init_fn=seed_worker_transform)
    flips = [(x[:, 0, 0, 0] > x[:, 0, 0, -1]).tolist() for x, _, _ in loader]  # one batch per worker
    assert flips[0] != flips[1], "both workers drew the same flips"


def test_synthetic_source_splits_follow_the_generator(tmp_path):
    from r2m_lab.data.sources import SyntheticSource

    def splits(families, domain):
        return SyntheticSource("x", families, domain, {}, str(tmp_path)).splits()

    assert splits(["swap"], "A") == ("train", "val", "test")
    assert splits(["swap", "edit"], "B") == ("val", "test")
    assert splits(["djpeg"], "A") == ("test",)
    assert splits(["djpeg"], "B") == ()
    with pytest.raises(ValueError, match="has no 'train' split"):
        SyntheticSource("x", ["grid"], "A", {}, str(tmp_path)).frames("train")
