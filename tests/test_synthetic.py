"""Tests of the embedded synthetic benchmark (r2m_lab.data.synthetic) on a tiny configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from r2m_lab.data import synthetic as syn
from r2m_lab.data.synthetic import (
    DOMAINS,
    SEEN_FAMILIES,
    UNSEEN_FAMILIES,
    SyntheticConfig,
    build,
    load_cell,
    load_pretext,
)

TINY = SyntheticConfig(
    seed=3, image_size=32, frames_per_video=2, train_videos=2, val_videos=2, test_videos=2, pretext_images=20
)

# The documented cell list, written out independently of syn.cell_keys() so a change to either is caught.
EXPECTED_CELLS = (
    [("train", "A", s) for s in ("real", *SEEN_FAMILIES)]
    + [(split, d, s) for split in ("val", "test") for d in DOMAINS for s in ("real", *SEEN_FAMILIES)]
    + [("test", "A", s) for s in UNSEEN_FAMILIES]
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(TINY, tmp_path_factory.mktemp("cache"), progress=False)


def _npz(root: Path, split: str, domain: str, source: str) -> dict[str, np.ndarray]:
    with np.load(root / split / domain / f"{source}.npz") as z:
        return {k: z[k] for k in z.files}


def test_layout_and_manifest(root: Path) -> None:
    assert root.name == f"synthetic-{TINY.fingerprint()}"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["generator_version"] == syn.GENERATOR_VERSION
    assert manifest["config"] == {
        "seed": 3,
        "image_size": 32,
        "frames_per_video": 2,
        "train_videos": 2,
        "val_videos": 2,
        "test_videos": 2,
        "pretext_images": 20,
    }
    assert sorted(manifest["cells"]) == sorted("/".join(k) for k in EXPECTED_CELLS)
    assert sorted(syn.cell_keys()) == sorted(EXPECTED_CELLS)
    # No temporary folder left beside the benchmark.
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_every_cell_has_right_shapes_and_labels(root: Path) -> None:
    for split, domain, source in EXPECTED_CELLS:
        cell = load_cell(root, split, domain, source)
        n = 2 * 2  # videos x frames_per_video
        assert cell.images.shape == (n, 32, 32, 3) and cell.images.dtype == np.uint8
        assert cell.labels.shape == (n,) and cell.labels.dtype == np.int64
        assert (cell.labels == (0 if source == "real" else 1)).all()
        assert cell.video_ids.shape == (n,) and cell.video_ids.dtype.kind == "U"
        assert cell.video_ids[0] == f"synthetic/{split}/{domain}/{source}/0000"
        # frames_per_video consecutive frames per video
        assert list(cell.video_ids) == [cell.video_ids[0]] * 2 + [cell.video_ids[2]] * 2


def test_video_ids_unique_across_cells(root: Path) -> None:
    seen: set[str] = set()
    for key in EXPECTED_CELLS:
        ids = set(load_cell(root, *key).video_ids.tolist())
        assert len(ids) == 2
        assert not ids & seen
        seen |= ids


def test_pretext(root: Path) -> None:
    images, labels, names = load_pretext(root)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (20,) and labels.dtype == np.int64
    assert len(names) == len(syn._PHOTOS_A) + len(syn._PHOTOS_B) == len(set(names))
    assert labels.min() >= 0 and labels.max() < len(names)


def test_deterministic(root: Path, tmp_path: Path) -> None:
    again = build(TINY, tmp_path / "again", progress=False)
    other = build(SyntheticConfig(**{**TINY.__dict__, "seed": 4}), tmp_path / "other", progress=False)
    assert other.name != root.name
    differs = False
    for key in EXPECTED_CELLS:
        a, b, c = load_cell(root, *key), load_cell(again, *key), load_cell(other, *key)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.video_ids, b.video_ids)
        differs |= not np.array_equal(a.images, c.images)
    np.testing.assert_array_equal(load_pretext(root)[0], load_pretext(again)[0])
    assert differs


def test_fingerprint_tracks_every_field() -> None:
    fp = TINY.fingerprint()
    assert fp == SyntheticConfig(**TINY.__dict__).fingerprint() and len(fp) == 12
    for field, value in TINY.__dict__.items():
        assert SyntheticConfig(**{**TINY.__dict__, field: value + 1}).fingerprint() != fp


def test_reuse_does_not_regenerate(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mtime = (root / "manifest.json").stat().st_mtime_ns

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated")

    monkeypatch.setattr(syn, "_generate_cell", boom)
    monkeypatch.setattr(syn, "_generate_pretext", boom)
    assert build(TINY, root.parent, progress=False) == root
    assert (root / "manifest.json").stat().st_mtime_ns == mtime


def test_crash_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = syn._generate_cell
    calls = []

    def crash_on_third(*args: object, **kwargs: object) -> dict[str, np.ndarray]:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(syn, "_generate_cell", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(TINY, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_cell_lists_choices(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="swap, reenact, synthesis, edit"):
        load_cell(root, "test", "A", "faceswap")
    with pytest.raises(ValueError, match="train, val, test"):
        load_cell(root, "dev", "A", "real")
    with pytest.raises(ValueError, match="A, B"):
        load_cell(root, "test", "C", "real")
    # Valid names, but not a cell: the message lists the cells that exist.
    with pytest.raises(FileNotFoundError, match="train/A/real"):
        load_cell(root, "train", "B", "real")
    with pytest.raises(FileNotFoundError, match="test/A/djpeg"):
        load_cell(root, "test", "B", "djpeg")
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_cell(tmp_path, "test", "A", "real")


def _occupancy(boxes: np.ndarray, shapes: dict[int, tuple[int, int]]) -> dict[int, np.ndarray]:
    """Per photo, a boolean map of every pixel covered by one of ``boxes`` (photo, y, x, h, w); -1 rows skipped."""
    occ = {p: np.zeros(s, dtype=bool) for p, s in shapes.items()}
    for p, y, x, h, w in boxes:
        if p >= 0:
            occ[p][y : y + h, x : x + w] = True
    return occ


def test_no_train_pixel_in_val_or_test(root: Path) -> None:
    names, photos = syn._load_photos()
    shapes = {i: p.shape[:2] for i, p in enumerate(photos)}
    train_boxes = [load_pretext_boxes(root)]
    for split, domain, source in EXPECTED_CELLS:
        if split == "train":
            z = _npz(root, split, domain, source)
            train_boxes += [z["boxes"], z["donor_boxes"]]
    occ = _occupancy(np.concatenate(train_boxes), shapes)
    for split, domain, source in EXPECTED_CELLS:
        if split == "train":
            continue
        z = _npz(root, split, domain, source)
        for p, y, x, h, w in np.concatenate([z["boxes"], z["donor_boxes"]]):
            if p >= 0:
                assert not occ[p][y : y + h, x : x + w].any(), (split, domain, source, names[p])
    # Domain A cells draw from domain A photos only, domain B from B.
    a_ids = set(syn._domain_photo_ids("A"))
    for split, domain, source in EXPECTED_CELLS:
        ids = set(_npz(root, split, domain, source)["boxes"][:, 0].tolist())
        assert ids <= a_ids if domain == "A" else not ids & a_ids


def load_pretext_boxes(root: Path) -> np.ndarray:
    with np.load(root / "pretext.npz") as z:
        return z["boxes"]


def test_regions_disjoint_and_tracks_inside_at_default_size() -> None:
    """The region layout guarantees no overlap for the default 64 px crops, beyond the tiny fixture's few boxes."""
    names, photos = syn._load_photos()
    for photo in photos:
        regions = syn._regions(photo.shape)
        occ = np.zeros(photo.shape[:2], dtype=np.int32)
        for y0, x0, y1, x1 in regions.values():
            assert min(y1 - y0, x1 - x0) >= 64 + 8
            occ[y0:y1, x0:x1] += 1
        assert occ.max() == 1
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        pid, pos = syn._sample_tracks(rng, list(range(len(names))), split, 300, 8, 64)
        for p, track in zip(pid, pos, strict=True):
            y0, x0, y1, x1 = syn._regions(photos[p].shape)[split]
            assert (track[:, 0] >= y0).all() and (track[:, 0] + 64 <= y1).all()
            assert (track[:, 1] >= x0).all() and (track[:, 1] + 64 <= x1).all()
            assert np.abs(np.diff(track, axis=0)).max() <= 2  # drifts a few pixels per frame


@pytest.mark.parametrize("family", ["swap", "reenact", "edit", "djpeg", "grid", "common"])
def test_fake_differs_from_source_mostly_inside_mask(family: str) -> None:
    rng = np.random.default_rng(1)
    pid, pos = syn._sample_tracks(rng, syn._domain_photo_ids("A"), "test", 2, 4, 64)
    videos = syn._extract(pid, pos, 64)
    real = syn._augment(rng, videos[0])
    donor = syn._augment(rng, videos[1])
    fake, mask = syn._forge(real, family, rng, syn._fingerprint_pattern(0), donor=lambda: donor)
    assert fake.shape == real.shape and mask.shape == (64, 64)
    diff = np.abs(fake - real).mean(axis=(0, 3))
    inside, outside = diff[mask > 0.9].mean(), diff[mask == 0].mean()
    assert outside < 1e-3 < 2.0 < inside  # untouched outside the mask, clearly changed inside
    assert 0.05 < (mask > 0.5).mean() < 0.6  # a face-sized region, not the whole frame


def test_synthesis_changes_whole_frame() -> None:
    rng = np.random.default_rng(2)
    pid, pos = syn._sample_tracks(rng, syn._domain_photo_ids("A"), "test", 1, 2, 32)
    real = syn._augment(rng, syn._extract(pid, pos, 32)[0])
    fake, mask = syn._forge(real, "synthesis", rng, syn._fingerprint_pattern(0))
    assert (mask == 1).all()
    assert np.abs(fake - real).mean(axis=(0, 3)).min() > 0.5


def test_video_frames_share_source_and_drift(root: Path) -> None:
    z = _npz(root, "test", "A", "real")
    boxes = z["boxes"].reshape(2, 2, 5)  # videos x frames x (photo, y, x, h, w)
    assert (boxes[:, :, 0] == boxes[:, :1, 0]).all()
    assert np.abs(np.diff(boxes[:, :, 1:3], axis=1)).max() <= 2


def test_bad_config_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        build(SyntheticConfig(image_size=4096), tmp_path, progress=False)
    with pytest.raises(ValueError, match="positive"):
        build(SyntheticConfig(image_size=32, test_videos=0), tmp_path, progress=False)
