"""Frame sources, frame identity, balanced sampling, and the DeepfakeBench index reader on a tree made here."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest

from r2m_lab.data.loaders import balanced_sampler
from r2m_lab.data.sources import DeepfakeBenchSource, FrameSet, frame_keys
from tests.conftest import CONF, compose_config


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
    draws = np.array([frame for _, frame in balanced_sampler(labels, 4000, seed=0)])
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


def test_draws_of_one_frame_get_different_augmentations_whichever_worker_loads_them():
    import albumentations as A
    import torch

    from r2m_lab.data.loaders import DrawSampler, FrameDataset, build_transform

    # 16 copies of one image; horizontal flips are the only randomness, so each output reveals one coin toss.
    image = np.tile(np.arange(8, dtype=np.uint8)[None, :, None], (8, 1, 3))
    frames = FrameSet(
        "x", np.zeros(16, dtype=np.int64), np.array([f"v{i}" for i in range(16)]), images=image[None].repeat(16, 0)
    )
    inputs = {"input_size": 8, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    dataset = FrameDataset(frames, build_transform(inputs, [A.HorizontalFlip(p=0.5)], seed=3))
    sampler = DrawSampler(None, 16, 16, seed=0)

    def flips(workers: int) -> list[bool]:
        sampler.set_epoch(0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=workers)
        return [f for x, _, _ in loader for f in (x[:, 0, 0, 0] > x[:, 0, 0, -1]).tolist()]

    one = flips(0)
    assert 0 < sum(one) < len(one), "every draw got the same flip"
    assert flips(2) == one, "two workers (one batch each) drew other augmentations than one process"


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


# --- the real-data path: an FF++-shaped and a DF40-shaped tree of tiny PNG crops -----------------------------------


def astronaut_crop(label: str, video: int, frame: int, size: int = 32) -> np.ndarray:
    """A (size, size, 3) uint8 BGR face crop of scikit-image's astronaut, moved per frame; fakes are blurred."""
    from skimage import data

    image = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)[30:230, 150:350]  # (200, 200, 3) around the face
    x = 10 * video + 3 * frame
    crop = cv2.resize(image[x : x + 160, x : x + 160], (size, size), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(crop, (5, 5), 0) if "real" not in label.lower() else crop


def write_tree(root, dataset, labels, splits=("train", "val", "test"), levels=("c23",), videos=2, frames=4,
               windows=False, prefix=None):  # fmt: skip
    """Write PNGs and ``dataset_json/<dataset>.json`` (by the raw schema, as a released file would be)."""
    index = {dataset: {}}
    for label in labels:
        for split in splits:
            by_level = {}
            for level in levels or (None,):
                vids = {}
                for v in range(videos):
                    name = f"{split}{v:03d}"
                    parts = [prefix or dataset, label, *([level] if level else []), "frames", name]
                    rels = []
                    for j in range(frames):
                        rel = [*parts, f"{j:03d}.png"]
                        path = root.joinpath(*rel)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        cv2.imwrite(str(path), astronaut_crop(label, v, j))
                        rels.append(("\\" if windows else "/").join(rel))
                    vids[name] = {"label": label, "frames": rels}
                by_level[level] = vids
            index[dataset].setdefault(label, {})[split] = by_level if levels else by_level[None]
    (root / "dataset_json").mkdir(exist_ok=True)
    (root / "dataset_json" / f"{dataset}.json").write_text(json.dumps(index))
    return root / "dataset_json" / f"{dataset}.json"


def source(root, dataset="FF-DF", real=("FF-real",), fake=("FF-DF",), **kw):
    return DeepfakeBenchSource(
        "x", dataset, str(root / "dataset_json" / f"{dataset}.json"), str(root), list(real), list(fake), **kw
    )


def test_ffpp_reader_compression_levels_and_windows_paths(tmp_path):
    write_tree(tmp_path, "FF-DF", ["FF-real", "FF-DF"], levels=("c23", "c40"), windows=True)
    c40 = source(tmp_path, compression="c40").frames("test")
    assert len(c40) == 2 * 2 * 4 and all("/c40/" in p for p in c40.paths)
    assert c40.image(0).shape == (32, 32, 3)
    with pytest.raises(ValueError, match=r"compression levels \['c23', 'c40'\]; data.compression='raw'"):
        source(tmp_path, compression="raw").frames("test")
    with pytest.raises(ValueError, match="data.compression=None"):
        source(tmp_path, compression=None).frames("test")


def test_df40_reader_without_levels(tmp_path):
    write_tree(tmp_path, "FSAll_ff", ["FSAll_Real", "FSAll_Fake"], splits=("test",), levels=(), prefix="DF40")
    src = source(tmp_path, "FSAll_ff", ["FSAll_Real"], ["FSAll_Fake"], method="FSAll", domain="ff")
    test = src.frames("test")
    assert len(test) == 16 and test.n_fake == 8
    assert set(test.video_ids) == {
        f"FSAll_ff/{lab}/test{v:03d}" for lab in ("FSAll_Real", "FSAll_Fake") for v in (0, 1)
    }
    with pytest.raises(ValueError, match="no frames in split 'train'"):
        src.frames("train")
    with pytest.raises(ValueError, match="unknown DF40 method 'simswp'"):
        source(tmp_path, "FSAll_ff", method="simswp")


def test_sampling_evenly_spaced_vs_first_n(tmp_path):
    write_tree(tmp_path, "FF-DF", ["FF-real", "FF-DF"], frames=7)

    def frame_numbers(**kw):
        fs = source(tmp_path, **kw).frames("train")
        return [int(p[-7:-4]) for p in fs.paths if p.split("/")[-2] == "train000" and "FF-real" in p]

    assert frame_numbers(frames_per_video=3) == [0, 3, 6]
    assert frame_numbers(frames_per_video=3, dfb_compat=True) == [0, 1, 2]
    assert frame_numbers(frames_per_video=None) == list(range(7))
    # val/test: every frame unless test_frames_per_video says otherwise
    assert len(source(tmp_path, frames_per_video=3).frames("test")) == 4 * 7
    assert len(source(tmp_path, frames_per_video=3, test_frames_per_video=2).frames("val")) == 4 * 2
    with pytest.raises(ValueError, match="frames_per_video=0"):
        source(tmp_path, frames_per_video=0)


def test_missing_frames_skip_reports_and_error_refuses(tmp_path):
    write_tree(tmp_path, "FF-DF", ["FF-real", "FF-DF"])
    frames_dir = tmp_path / "FF-DF" / "FF-DF" / "c23" / "frames"
    (frames_dir / "test000" / "001.png").unlink()
    for f in (frames_dir / "test001").iterdir():  # a whole video gone
        f.unlink()
    src = source(tmp_path)
    test = src.frames("test")
    report = src.reports["test"]
    assert len(test) == 2 * 4 + 3 and report["missing_frames"] == 5 and report["frames_kept"] == 11
    assert report["missing_per_video"] == {"FF-DF/FF-DF/test000": 1, "FF-DF/FF-DF/test001": 4}
    assert report["dropped_videos"] == ["FF-DF/FF-DF/test001"]
    assert report["first_missing"][0].endswith("test000/001.png")
    assert src.frames("train") and src.reports["train"]["missing_frames"] == 0
    with pytest.raises(FileNotFoundError, match=r"5 of 16 frames missing in 2 of 4 videos.*test000/001.png"):
        source(tmp_path, missing_frames="error").frames("test")
    with pytest.raises(ValueError, match="missing_frames='drop'"):
        source(tmp_path, missing_frames="drop")


def test_unreadable_frames_error_substitute_and_verify(tmp_path):
    write_tree(tmp_path, "FF-DF", ["FF-real", "FF-DF"])
    bad = tmp_path / "FF-DF" / "FF-real" / "c23" / "frames" / "test000" / "002.png"
    bad.write_bytes(b"not a png")
    strict = source(tmp_path).frames("test")
    i = strict.paths.index(str(bad))
    with pytest.raises(OSError, match=f"Cannot read frame {bad}"):
        strict.image(i)
    lenient = source(tmp_path, unreadable_frames="substitute").frames("test")
    # the nearest readable frame of the same video: frame 001 (distance 1, tried before 003)
    assert np.array_equal(lenient.image(i), lenient.image(i - 1)) and lenient.unreadable_paths == {str(bad)}
    # verify_frames decodes at start-up, so the corrupt file is handled by missing_frames before any training
    src = source(tmp_path, verify_frames=True)
    assert str(bad) not in src.frames("test").paths and src.reports["test"]["missing_frames"] == 1


def test_masks_only_when_asked(tmp_path):
    write_tree(tmp_path, "FF-DF", ["FF-real", "FF-DF"])
    path = tmp_path / "dataset_json" / "FF-DF.json"
    index = json.loads(path.read_text())
    for label in ("FF-real", "FF-DF"):
        for rec in index["FF-DF"][label]["test"]["c23"].values():
            rec["masks"] = [f.replace("/frames/", "/masks/") for f in rec["frames"]] if label == "FF-DF" else None
    path.write_text(json.dumps(index))
    assert source(tmp_path).frames("test").mask_paths is None
    # real videos have no masks: their frames get None, the fakes' frames their own mask
    both = source(tmp_path, with_masks=True).frames("test")
    assert [m is None for m in both.mask_paths] == [y == 0 for y in both.labels.tolist()]
    assert all(
        m.replace("/masks/", "/frames/") == f for m, f in zip(both.mask_paths, both.paths, strict=True) if m is not None
    )
    with pytest.raises(ValueError, match="with_masks=true but no frame of FF-DF/train has a mask"):
        source(tmp_path, with_masks=True).frames("train")
    fakes = source(tmp_path, real=(), fake=("FF-DF",), exclude_labels=["FF-real"], with_masks=True).frames("test")
    assert fakes.n_real == 0 and all("/masks/" in m for m in fakes.mask_paths)
    assert fakes.subset(np.array([1, 0])).mask_paths == fakes.mask_paths[1::-1]


def test_video_ids_unique_across_datasets_and_shared_reals_read_once(tmp_path):
    from r2m_lab.data.sources import ConcatSource

    # Two DF40-style families whose index lists the same real frames (same paths) and reuse video names.
    write_tree(tmp_path, "FSAll_ff", ["FSAll_Real", "FSAll_Fake"], levels=(), prefix="DF40")
    write_tree(tmp_path, "FRAll_ff", ["FRAll_Real", "FRAll_Fake"], levels=(), prefix="DF40")
    for name in ("FSAll_ff", "FRAll_ff"):  # point both real labels at one folder of real frames
        p = tmp_path / "dataset_json" / f"{name}.json"
        p.write_text(p.read_text().replace(f"DF40/{name[:2]}All_Real/", "DF40/shared_real/"))
    for split in ("train", "val", "test"):
        for v in range(2):
            d = tmp_path / "DF40" / "shared_real" / "frames" / f"{split}{v:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for j in range(4):
                cv2.imwrite(str(d / f"{j:03d}.png"), astronaut_crop("real", v, j))
    fs = source(tmp_path, "FSAll_ff", ["FSAll_Real"], ["FSAll_Fake"])
    fr = source(tmp_path, "FRAll_ff", ["FRAll_Real"], ["FRAll_Fake"])
    a, b = fs.frames("test"), fr.frames("test")
    assert not set(a.video_ids) & set(b.video_ids), "same video name in two datasets must give two video ids"
    joint = ConcatSource("joint", {"fs": fs, "fr": fr}).frames("test")
    assert len(joint) == len(a) + len(b) - a.n_real and joint.n_real == a.n_real  # shared reals once
    with pytest.raises(ValueError, match="must be the parts"):
        ConcatSource("joint", {"fs": fs}, families=["fs", "fr"])


def test_balanced_sampler_on_real_data_frames(tmp_path):
    write_tree(tmp_path, "FF-DF", ["FF-real", "FF-DF"])
    # 1 real video against 2 fake ones: the sampler still draws half real, half fake
    train = source(tmp_path, exclude_labels=[]).frames("train")
    keep = np.array([i for i, v in enumerate(train.video_ids) if v != "FF-DF/FF-real/train001"])
    train = train.subset(keep)
    draws = np.array([frame for _, frame in balanced_sampler(train.labels, 4000, seed=0)])
    assert train.labels.mean() == pytest.approx(2 / 3) and abs(train.labels[draws].mean() - 0.5) < 0.05


# --- configs: every real-data option instantiates and names what it needs; benchmarks; augmentation knobs ----------

REAL_DATA = sorted(p.stem for p in CONF.glob("data/*.yaml") if not p.stem.startswith("synthetic"))


@pytest.mark.parametrize("option", REAL_DATA)
def test_every_real_data_config_names_its_missing_index(tmp_path, option):
    from hydra.utils import instantiate

    (tmp_path / "data").mkdir()
    cfg = compose_config(tmp_path, [f"data={option}", f"paths.data_dir={tmp_path}/data"])
    src = instantiate(cfg.data)
    first = next(iter(src.parts.values())) if hasattr(src, "parts") else src
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}/data/dataset_json/{first.dataset}.json")):
        src.frames("test")
    cfg.paths.data_dir = "/no/such/root"  # every path of the data config follows paths.data_dir
    with pytest.raises(
        FileNotFoundError,
        match=r"Data root .* /no/such/root\n\(its index would be /no/such/root/dataset_json/.*\nGet the data: .*https://",
    ):
        instantiate(cfg.data).frames("test")


def test_benchmarks_list_their_protocols(tmp_path):
    ffpp = compose_config(tmp_path, ["benchmark=ffpp"]).benchmark
    assert list(ffpp.protocols) == ["in_distribution", "cross_dataset"]
    assert [d.dataset for d in ffpp.specialists.values()] == ["FF-DF", "FF-F2F", "FF-FS", "FF-NT"]
    assert [d.dataset for d in ffpp.protocols.cross_dataset.values()] == [
        "Celeb-DF-v2",
        "DeepFakeDetection",
        "DFDC",
        "DFDCP",
    ]
    assert ffpp.joint.name == "faceforensics_all" and list(ffpp.joint.families) == ["FF-DF", "FF-F2F", "FF-FS", "FF-NT"]
    df40 = compose_config(tmp_path, ["benchmark=df40"]).benchmark
    assert list(df40.protocols) == ["in_distribution", "cross_dataset", "unseen"]
    assert [d.dataset for d in df40.specialists.values()] == ["FSAll_ff", "FRAll_ff", "EFSAll_ff"]
    assert [d.dataset for d in df40.protocols.cross_dataset.values()] == ["FSAll_cdf", "FRAll_cdf", "EFSAll_cdf"]
    assert len(df40.protocols.unseen) == 9 and df40.protocols.unseen.heygen.real_labels == ["heygen_Real"]
    assert [d.dataset for d in df40.joint.parts.values()] == ["FSAll_ff", "FRAll_ff", "EFSAll_ff"]
    for bench in (ffpp, df40):  # selection only ever looks at the specialists' own val splits
        assert [d.name for d in bench.validation.values()] == [d.name for d in bench.specialists.values()]


def test_df40_method_config_follows_its_overrides(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config(tmp_path, ["data=df40_method", "data.method=facedancer", "data.domain=cdf"])
    assert (cfg.data.dataset, list(cfg.data.real_labels), list(cfg.data.fake_labels)) == (
        "facedancer_cdf",
        ["facedancer_Real"],
        ["facedancer_Fake"],
    )
    assert cfg.data.index is None and cfg.data.index_dir == f"{tmp_path}/data/dataset_json"
    assert instantiate(cfg.data).index == tmp_path / "data" / "dataset_json" / "facedancer_cdf.json"
    assert cfg.data.name == "df40_facedancer_cdf", "per-method specialists get their own checkpoint path"


def test_augmentation_knobs_change_the_pipeline(tmp_path):
    import albumentations as A

    from r2m_lab.data.loaders import build_augment

    def transforms(*overrides):
        cfg = compose_config(tmp_path, ["backbone=clip_vit_b16", *overrides], smoke=False)
        return {type(t).__name__: t for t in build_augment(cfg.backbone.recipe.augment)}

    paper = transforms()
    assert list(paper) == ["HorizontalFlip", "Rotate", "GaussianBlur", "RandomBrightnessContrast", "ImageCompression"]
    assert all(t.p == 0.5 for t in paper.values()) and paper["ImageCompression"].quality_range == (40, 100)
    changed = transforms(
        "backbone.recipe.augment.flip.p=0",
        "backbone.recipe.augment.jpeg.quality_range=[70,90]",
        "backbone.recipe.augment.blur=null",
        "backbone.recipe.augment.rotate.limit=20",
    )
    assert "GaussianBlur" not in changed and changed["HorizontalFlip"].p == 0
    assert changed["ImageCompression"].quality_range == (70, 90) and changed["Rotate"].limit == (-20, 20)
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    assert np.array_equal(A.Compose([changed["HorizontalFlip"]])(image=image)["image"], image)  # p=0: never flips
    with pytest.raises(TypeError, match="must be a mapping"):
        build_augment([{"_target_": "albumentations.HorizontalFlip"}])


def test_real_data_finetune_then_evaluate(tmp_path):
    """A tiny FF++-shaped tree: stage=finetune on FF-DF, then stage=evaluate on FF-DF test and Celeb-DF v2."""
    from r2m_lab.stages import run_stage
    from r2m_lab.stages.artifacts import specialist_path

    data = tmp_path / "data"
    write_tree(data, "FF-DF", ["FF-real", "FF-DF"], videos=3, frames=4, windows=True)
    write_tree(data, "Celeb-DF-v2", ["CelebDFv2_real", "CelebDFv2_fake"], splits=("test",), levels=())
    bench = [
        "benchmark=ffpp",
        *(f"~benchmark.protocols.in_distribution.{k}" for k in ("f2f", "fs", "nt")),
        *(f"~benchmark.protocols.cross_dataset.{k}" for k in ("dfd", "dfdc", "dfdcp")),
        f"paths.data_dir={data}",
    ]
    cfg = compose_config(tmp_path, ["stage=finetune", "data=faceforensics_df", "data.frames_per_video=2", *bench])
    card = run_stage(cfg)
    assert card["train_frames"] == 2 * 3 * 2 and specialist_path(cfg, "faceforensics_df").is_file()
    cfg = compose_config(
        tmp_path,
        ["stage=evaluate", "stage.model=specialist:faceforensics_df", f"paths.output_dir={tmp_path}/eval", *bench],
    )
    report = run_stage(cfg)
    (label,) = report["models"]
    tests = report["models"][label]["test"]
    assert set(tests) == {"in_distribution/df", "cross_dataset/celebdf_v2"}
    for name, metrics in tests.items():
        assert 0.0 <= metrics["frame"]["auc"] <= 1.0, name
        assert 0.0 <= metrics["video"]["auc"] <= 1.0, name
    assert (tmp_path / "eval" / "metrics.json").is_file()
