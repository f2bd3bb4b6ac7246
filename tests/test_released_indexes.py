"""Indexes as DeepfakeBench and DF40 release them, read on trees the tests build (tiny PNGs under tmp_path).

What the released files do, and what these trees copy (the JSON is written by hand, as their ``rearrange.py`` scripts
would write it; no code of theirs is used):

- frame paths are ``os.path.join(<root>, ...)``: absolute for an absolute root (DF40's always are), Windows paths
  with a drive letter when made on Windows (``C:\\data\\FaceForensics++\\...``);
- a video's frames are listed in directory order (``os.scandir``), not time order; frame files are named by their
  frame number in the clip (``000.png``, ``109.png``, ...), DF40's image sets by other names (``seed0188.png``);
- FF++ fakes list ``masks`` (possibly empty), real videos have no ``masks`` key;
- ``DFDC.json`` has one video's record in place of each label's ``val`` node;
- DF40's indexes often have an empty ``val``; a per-method index may have no real video in ``train``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from r2m_lab.data.index import IndexSchemaError
from r2m_lab.data.sources import DeepfakeBenchSource, FrameSet
from tests.conftest import compose_config

# Frame numbers of 12 frames spread over a ~1000-frame clip, and the order a directory listing gave them.
STEMS = [f"{n:03d}" for n in np.linspace(0, 990, 12).astype(int)]  # 000, 090, ..., 990: time order
LISTED = [STEMS[i] for i in (6, 1, 4, 11, 0, 9, 3, 7, 2, 10, 5, 8)]  # 540, 090, 360, 990, 000, ...


def png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((4, 4, 3), value % 256, np.uint8))


def win(path: Path, root: Path, drive_root: str) -> str:
    """``path`` as a Windows machine whose data root is ``drive_root`` (e.g. ``C:\\data``) would have listed it."""
    return drive_root + "\\" + "\\".join(path.relative_to(root).parts)


def write_json(index_dir: Path, dataset: str, body: dict) -> Path:
    index_dir.mkdir(parents=True, exist_ok=True)
    path = index_dir / f"{dataset}.json"
    path.write_text(json.dumps({dataset: body}))
    return path


def ffpp_tree(root: Path, paths: str = "posix", videos=("000", "001", "002"), stems=LISTED) -> dict:
    """FF-DF as DeepfakeBench's rearrange.py writes it: absolute paths (or drive-letter ones), frames in directory
    order, masks for the fakes only (listed in their own directory order), splits by the FF++ pair lists."""
    ff = root / "FaceForensics++"

    def as_index(p: Path) -> str:
        return str(p) if paths == "posix" else win(p, root, "C:\\data")

    body: dict = {"FF-real": {}, "FF-DF": {}}
    for split_no, split in enumerate(("train", "val", "test")):
        body["FF-real"][split] = {"c23": {}}
        body["FF-DF"][split] = {"c23": {}}
        for v in videos:
            real, fake = f"{split_no}{v}", f"{split_no}{v}_{split_no}{int(v) + 5:03d}"
            real_dir = ff / "original_sequences" / "youtube" / "c23" / "frames" / real
            fake_dir = ff / "manipulated_sequences" / "Deepfakes" / "c23" / "frames" / fake
            mask_dir = ff / "manipulated_sequences" / "Deepfakes" / "c23" / "masks" / fake
            for s in stems:
                png(real_dir / f"{s}.png", int(s))
                png(fake_dir / f"{s}.png", int(s))
                png(mask_dir / f"{s}.png", 255)
            body["FF-real"][split]["c23"][real] = {
                "label": "FF-real",
                "frames": [as_index(real_dir / f"{s}.png") for s in stems],
            }
            body["FF-DF"][split]["c23"][fake] = {
                "label": "FF-DF",
                "frames": [as_index(fake_dir / f"{s}.png") for s in stems],
                "masks": [as_index(mask_dir / f"{s}.png") for s in reversed(stems)],
            }
    return body


def ffpp_source(root: Path, index_dir: Path, **kw) -> DeepfakeBenchSource:
    return DeepfakeBenchSource("ffpp", "FF-DF", None, str(root), ["FF-real"], ["FF-DF"], index_dir=str(index_dir), **kw)


def stems_of(frames: FrameSet, video: str) -> list[str]:
    return [Path(p).stem for p, v in zip(frames.paths, frames.video_ids, strict=True) if v == video]


# --- paths --------------------------------------------------------------------------------------------------------


def test_absolute_paths_that_exist_are_used_as_given(tmp_path):
    data = tmp_path / "data"
    write_json(tmp_path / "json", "FF-DF", ffpp_tree(data))
    (tmp_path / "elsewhere").mkdir()
    src = ffpp_source(tmp_path / "elsewhere", tmp_path / "json")  # data.root does not hold them: not needed
    test = src.frames("test")
    assert len(test) == 2 * 3 * 12 and all(p.startswith(str(data)) for p in test.paths)
    assert src.reports["test"]["missing_frames"] == 0


@pytest.mark.parametrize("paths", ["posix", "windows"])
def test_foreign_absolute_and_drive_letter_paths_are_rerooted(tmp_path, paths):
    # Made on another machine: /home/someone/datasets/FaceForensics++/... or C:\data\FaceForensics++\...
    made = tmp_path / "made"
    body = ffpp_tree(made, paths=paths)
    text = json.dumps(body)
    if paths == "posix":
        text = text.replace(str(made), "/home/someone/datasets")
    write_json(tmp_path / "json", "FF-DF", json.loads(text))
    data = tmp_path / "mnt" / "deepfakes"
    data.parent.mkdir()
    made.rename(data)  # the same tree, now somewhere else
    test = ffpp_source(data, tmp_path / "json").frames("test")
    assert len(test) == 2 * 3 * 12
    assert all(p.startswith(str(data / "FaceForensics++")) and Path(p).is_file() for p in test.paths)


def test_paths_that_map_nowhere_are_named(tmp_path, caplog):
    made = tmp_path / "made"
    write_json(tmp_path / "json", "FF-DF", ffpp_tree(made, paths="windows"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        ffpp_source(tmp_path / "empty", tmp_path / "json").frames("test")
    message = str(err.value)
    assert "none of the 72 frames listed" in message and "C:\\data\\FaceForensics++\\" in message
    assert f"data.root={tmp_path / 'empty'}" in message and "leading folders dropped" in message
    # one frame gone: reported as missing with the path the index names, the rest read
    made_frame = made / "FaceForensics++/original_sequences/youtube/c23/frames/2000" / f"{LISTED[0]}.png"
    made_frame.unlink()
    src = ffpp_source(made, tmp_path / "json")
    with caplog.at_level(logging.WARNING):
        assert len(src.frames("test")) == 2 * 3 * 12 - 1
    assert src.reports["test"]["first_missing"] == [win(made_frame, made, "C:\\data")]
    with pytest.raises(FileNotFoundError, match="1 of 72 frames missing"):
        ffpp_source(made, tmp_path / "json", missing_frames="error").frames("test")


# --- frame order and sampling ---------------------------------------------------------------------------------------


def test_frames_in_time_order_evenly_spaced(tmp_path):
    write_json(tmp_path / "json", "FF-DF", ffpp_tree(tmp_path / "data"))
    src = ffpp_source(tmp_path / "data", tmp_path / "json", frames_per_video=8, test_frames_per_video=None)
    train = src.frames("train")
    # 8 of 12 in time order: positions 0, 2, 3, 5, 6, 8, 9, 11 of the sorted frame numbers, first and last included
    expected = [STEMS[i] for i in (0, 2, 3, 5, 6, 8, 9, 11)]
    assert stems_of(train, "FF-DF/FF-real/0000") == expected
    assert stems_of(src.frames("test"), "FF-DF/FF-DF/2000_2005") == STEMS  # all of them, in time order
    assert src.reports["train"]["listed_order_videos"] == 0


def test_dfb_compat_chooses_the_reference_loaders_frames(tmp_path):
    write_json(tmp_path / "json", "FF-DF", ffpp_tree(tmp_path / "data"))

    def chosen(compat):
        src = ffpp_source(tmp_path / "data", tmp_path / "json", frames_per_video=8, dfb_compat=compat)
        return stems_of(src.frames("train"), "FF-DF/FF-real/0000")

    # DeepfakeBench (training/dataset/abstract_dataset.py since May 2024): frames sorted by integer stem, then, as it
    # sets its total to N before taking a step of total // N, the first N of them.
    assert chosen(True) == chosen("deepfakebench") == STEMS[:8]
    # DF40's fork of it sorts only in video mode: the first N as listed.
    assert chosen("df40") == LISTED[:8]
    with pytest.raises(ValueError, match="dfb_compat='first'"):
        ffpp_source(tmp_path / "data", tmp_path / "json", dfb_compat="first")


def test_non_numeric_names_keep_their_listed_order(tmp_path):
    # A DF40-style image set: one image per "video" for most, a few with several generated images, not numbered.
    root = tmp_path / "data"
    names = ["seed0188", "seed0007", "seed1450", "seed0042"]
    fake_dir = root / "DF40" / "StyleGAN2" / "ff" / "frames" / "v0"
    real_dir = root / "FaceForensics++" / "original_sequences" / "youtube" / "c23" / "frames" / "000"
    for n in names:
        png(fake_dir / f"{n}.png")
    for s in LISTED:
        png(real_dir / f"{s}.png")
    fakes = [str(fake_dir / f"{n}.png") for n in names]
    reals = [str(real_dir / f"{s}.png") for s in LISTED]
    body = {
        "StyleGAN2_Fake": {"test": {"v0": {"label": "StyleGAN2_Fake", "frames": fakes}}},
        "StyleGAN2_Real": {"test": {"000": {"label": "StyleGAN2_Real", "frames": reals}}},
    }
    write_json(tmp_path / "json", "StyleGAN2_ff", body)
    src = DeepfakeBenchSource(
        "sg2", "StyleGAN2_ff", None, str(root), ["StyleGAN2_Real"], ["StyleGAN2_Fake"], index_dir=str(tmp_path / "json")
    )
    test = src.frames("test")
    assert stems_of(test, "StyleGAN2_ff/StyleGAN2_Fake/v0") == names  # as listed: no frame number to sort by
    assert stems_of(test, "StyleGAN2_ff/StyleGAN2_Real/000") == STEMS  # numbered: time order
    assert src.reports["test"]["listed_order_videos"] == 1


# --- one malformed node -------------------------------------------------------------------------------------------


def dfdc_tree(root: Path) -> Path:
    """DFDC.json as DeepfakeBench's rearrange.py writes it: each label's ``val`` is the last test video's record."""
    body: dict = {}
    for label, y in (("DFDC_Real", 0), ("DFDC_Fake", 1)):
        body[label] = {"train": {}, "test": {}}
        for split in ("train", "test"):
            for v in range(3):
                d = root / "DFDC" / split / "frames" / f"{label}{v}"
                for s in LISTED[:4]:
                    png(d / f"{s}.png", y)
                body[label][split][f"{label}{v}"] = {
                    "label": label,
                    "frames": [str(d / f"{s}.png") for s in LISTED[:4]],
                }
        body[label]["val"] = dict(body[label]["test"][f"{label}2"])
    return write_json(root / "dataset_json", "DFDC", body)


def test_malformed_val_node_does_not_block_test(tmp_path, caplog):
    dfdc_tree(tmp_path)

    def source(**kw):
        return DeepfakeBenchSource(
            "dfdc",
            "DFDC",
            None,
            str(tmp_path),
            ["DFDC_Real"],
            ["DFDC_Fake"],
            index_dir=str(tmp_path / "dataset_json"),
            **kw,
        )

    src = source()
    with caplog.at_level(logging.WARNING):
        test = src.frames("test")
    assert len(test) == 2 * 3 * 4
    expected = [
        f"{src.index}: DFDC/{label}/val: a split must be an object {{video: record}}, found a single video record in "
        "its place"
        for label in ("DFDC_Real", "DFDC_Fake")
    ]
    assert src.reports["test"]["index_problems"] == expected  # reported with their key paths, not fatal
    assert all(e in caplog.text for e in expected)
    with pytest.raises(IndexSchemaError, match=r"DFDC/DFDC_Real/val: a split must be an object"):
        src.frames("val")  # read: fatal, named
    with pytest.raises(IndexSchemaError, match="data.val_source=train holds out part of train"):
        source().frames("train")  # auto must look at val to know whether to hold out: says how to avoid it
    held = source(val_source="train")
    train, val = held.frames("train"), held.frames("val")
    assert set(train.video_ids).isdisjoint(val.video_ids) and val.n_real and val.n_fake


def test_benchmark_ffpp_evaluation_reads_dfdc_test(tmp_path):
    from hydra.utils import instantiate

    dfdc_tree(tmp_path / "data")
    cfg = compose_config(tmp_path, ["benchmark=ffpp"])
    dfdc = instantiate(cfg.benchmark.protocols.cross_dataset.dfdc)
    assert len(dfdc.frames("test")) == 2 * 3 * 4 and len(dfdc.reports["test"]["index_problems"]) == 2


# --- masks --------------------------------------------------------------------------------------------------------


def test_masks_optional_per_video_and_paired_by_name(tmp_path):
    body = ffpp_tree(tmp_path / "data")
    body["FF-DF"]["test"]["c23"]["2001_2006"]["masks"] = []  # a fake without masks (rearrange.py writes [])
    write_json(tmp_path / "json", "FF-DF", body)
    src = ffpp_source(tmp_path / "data", tmp_path / "json", with_masks=True, frames_per_video=4)
    test = src.frames("test")
    for path, mask, vid, y in zip(test.paths, test.mask_paths, test.video_ids, test.labels, strict=True):
        if y == 0 or vid == "FF-DF/FF-DF/2001_2006":
            assert mask is None, path  # real videos have none; so does that fake
        else:
            assert mask == path.replace("/frames/", "/masks/")  # same frame, though masks are listed reversed
    assert src.reports["test"]["frames_without_mask"] == 3 * 12 + 12
    assert len(src.frames("train").mask_paths) == 2 * 3 * 4
    subset = test.subset(np.array([len(test) - 1, 0]))
    assert subset.mask_paths == [test.mask_paths[-1], test.mask_paths[0]]


# --- training and validation splits -------------------------------------------------------------------------------


def df40_method_tree(root: Path, train_reals: bool = True, val: bool = False, method: str = "simswap") -> Path:
    """<method>_ff as DF40 ships it: absolute paths, an empty ``val``, reals from FF++ (optionally none in train)."""
    real, fake = f"{method}_Real", f"{method}_Fake"
    body: dict = {real: {"train": {}, "val": {}, "test": {}}, fake: {"train": {}, "val": {}, "test": {}}}
    splits = ("train", "val", "test") if val else ("train", "test")
    for label, folder in ((real, "FaceForensics++/original_sequences/youtube/c23/frames"),
                          (fake, f"DF40/{method}/ff/frames")):  # fmt: skip
        for split in splits:
            if split == "train" and label == real and not train_reals:
                continue
            for v in range(10):
                d = root / folder / f"{split}{v:03d}"
                for s in LISTED[:3]:
                    png(d / f"{s}.png")
                frames = [str(d / f"{s}.png") for s in LISTED[:3]]
                body[label][split][f"{split}{v:03d}"] = {"label": label, "frames": frames}
    return write_json(root / "dataset_json", f"{method}_ff", body)


def simswap(root: Path, method: str = "simswap", **kw) -> DeepfakeBenchSource:
    return DeepfakeBenchSource(
        f"df40_{method}_ff", f"{method}_ff", None, str(root), [f"{method}_Real"], [f"{method}_Fake"],
        index_dir=str(root / "dataset_json"), method=method, domain="ff", **kw,
    )  # fmt: skip


def test_val_held_out_of_train_by_video_when_the_index_has_none(tmp_path, caplog):
    df40_method_tree(tmp_path)
    src = simswap(tmp_path)
    with caplog.at_level(logging.WARNING):
        train, val = src.frames("train"), src.frames("val")
    assert "lists no val video" in caplog.text and src.reports["val"]["val_from"] == "train hold-out"
    train_ids, val_ids = set(train.video_ids), set(val.video_ids)
    assert train_ids.isdisjoint(val_ids) and len(train_ids | val_ids) == 20  # every training video, once
    assert val.n_real and val.n_fake and len(val_ids) < 10  # both classes, a minority of the videos
    again = simswap(tmp_path)
    assert set(again.frames("val").video_ids) == val_ids  # the same videos every run
    assert set(simswap(tmp_path, val_fraction=0.6).frames("val").video_ids) > val_ids  # a threshold, not a re-draw
    with pytest.raises(ValueError, match="no frames in split 'val'"):
        simswap(tmp_path, val_source="index").frames("val")
    # an index that has a val split is read as it is, unless told to hold out
    df40_method_tree(tmp_path / "with_val", val=True)
    own = simswap(tmp_path / "with_val")
    assert {v.split("/")[-1][:3] for v in own.frames("val").video_ids} == {"val"}
    assert own.reports["val"]["val_from"] == "index" and len(own.frames("train")) == 2 * 10 * 3
    forced = simswap(tmp_path / "with_val", val_source="train")
    assert {v.split("/")[-1][:5] for v in forced.frames("val").video_ids} == {"train"}
    with pytest.raises(ValueError, match="val_source='holdout'"):
        simswap(tmp_path, val_source="holdout")


def test_held_out_reals_are_the_same_in_every_index_that_shares_them(tmp_path):
    from r2m_lab.data.sources import ConcatSource

    df40_method_tree(tmp_path, method="simswap")
    df40_method_tree(tmp_path, method="fomm")  # the same FF++ real videos (same files), another fake method
    parts = {m: simswap(tmp_path, method=m, val_fraction=0.3) for m in ("simswap", "fomm")}
    joint = ConcatSource("joint", parts)
    train, val = joint.frames("train"), joint.frames("val")
    assert set(train.keys).isdisjoint(val.keys), "a real frame in both train and val of the joint model"
    assert val.n_real and val.n_fake


@pytest.mark.parametrize("balanced", [True, False])
def test_one_class_training_split_is_refused(tmp_path, balanced):
    from r2m_lab.data.loaders import DetectionDataModule, build_transform

    df40_method_tree(tmp_path, train_reals=False)
    src = simswap(tmp_path, val_source="index")
    train, test = src.frames("train"), src.frames("test")
    assert train.n_real == 0 and train.n_fake == 30
    t = build_transform({"input_size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    with pytest.raises(ValueError, match=r"training split df40_simswap_ff/train has 0 real and 30 fake frames"):
        DetectionDataModule(train, test, t, t, batch_size=2, num_samples=4, balanced=balanced)
    with pytest.raises(ValueError, match=r"validation split .* no fake frame"):
        real_only = test.subset(np.flatnonzero(test.labels == 0))
        DetectionDataModule(test, real_only, t, t, batch_size=2, num_samples=4, balanced=balanced)
    DetectionDataModule(test, test, t, t, batch_size=2, num_samples=4, balanced=balanced)  # both classes: fine


# --- one index folder; DF40's names -------------------------------------------------------------------------------


def test_one_setting_for_the_index_folder(tmp_path):
    from hydra.utils import instantiate

    # DeepfakeBench keeps its indexes in <repo>/preprocessing/dataset_json, apart from the frames.
    index_dir = tmp_path / "DeepfakeBench" / "preprocessing" / "dataset_json"
    write_json(index_dir, "FF-DF", ffpp_tree(tmp_path / "datasets"))
    over = [f"paths.index_dir={index_dir}", f"paths.data_dir={tmp_path}/datasets"]
    cfg = compose_config(tmp_path, ["benchmark=ffpp", "data=faceforensics_df", *over])
    for data_cfg in (cfg.data, *cfg.benchmark.protocols.cross_dataset.values(), cfg.benchmark.joint):
        assert data_cfg.index_dir == str(index_dir), data_cfg.name
    assert len(instantiate(cfg.data).frames("test")) == 2 * 3 * 12
    one = compose_config(tmp_path, ["data=faceforensics_df", f"data.index={index_dir}/FF-DF.json"]).data
    assert instantiate(one).index == index_dir / "FF-DF.json"


# DF40's README, protocol 3: python training/test.py ... --test_dataset "deepfacelab" "heygen" "whichisreal" ...
DF40_PROTOCOL_3 = ["deepfacelab", "heygen", "whichisreal", "MidJourney", "stargan", "starganv2", "styleclip", "e4e",
                   "CollabDiff"]  # fmt: skip
# Label names of DF40's label table (training/config/{train,test}_config.yaml, label_dict) for the FE family.
DF40_FE_LABELS = {"e4e_Real", "e4e_Fake", "CollabDiff_Real", "CollabDiff_Fake", "Collaborative_Diffusion_Real",
                  "Collaborative_Diffusion_Fake", "stargan_Real", "stargan_Fake", "starganv2_Real", "starganv2_Fake",
                  "styleclip_Real", "styleclip_Fake"}  # fmt: skip


def test_unseen_sets_named_as_df40_protocol_reads_them(tmp_path):
    bench = compose_config(tmp_path, ["benchmark=df40"]).benchmark
    unseen = bench.protocols.unseen
    assert sorted(d.dataset for d in unseen.values()) == sorted(DF40_PROTOCOL_3)
    for d in unseen.values():
        assert (list(d.real_labels)[0], list(d.fake_labels)[0]) == (f"{d.dataset}_Real", f"{d.dataset}_Fake")


def test_df40_fe_configs_use_df40_names(tmp_path):
    from hydra.utils import instantiate

    for domain, e4e in (("ff", "e4e"), ("cdf", "e4e_cdf")):
        cfg = compose_config(tmp_path, [f"data=df40_fe_{domain}"]).data
        parts = cfg.parts
        assert [p.dataset for p in parts.values()] == [e4e, "CollabDiff", "stargan", "starganv2", "styleclip"]
        labels = {lab for p in parts.values() for lab in (*p.real_labels, *p.fake_labels)}
        assert labels <= DF40_FE_LABELS, labels - DF40_FE_LABELS
        assert cfg.get("families") is None  # one family: one step budget
        instantiate(cfg)
    with pytest.raises(Exception, match="unknown DF40 method 'FEAll'"):
        instantiate(compose_config(tmp_path, ["data=df40_method", "data.method=FEAll"]).data)


def test_e4e_reads_df40_protocol_file_or_its_rearrange_name(tmp_path, caplog):
    from hydra.utils import instantiate

    def e4e_index(name: str) -> None:
        d = tmp_path / "data" / "DF40" / "e4e" / "ff" / "inversions"
        png(d / "000_003.png", 1)
        png(tmp_path / "data" / "real" / "000" / "000.png", 0)
        write_json(tmp_path / "data" / "dataset_json", name, {
            "e4e_Fake": {"test": {"000_003": {"label": "e4e_Fake", "frames": [str(d / "000_003.png")]}}},
            "e4e_Real": {"test": {"000": {"label": "e4e_Real", "frames": [str(tmp_path / "data/real/000/000.png")]}}},
        })  # fmt: skip

    cfg = compose_config(tmp_path, ["data=df40_e4e"]).data
    e4e_index("e4e_ff")  # what DF40's rearrange.py writes
    src = instantiate(cfg)
    with caplog.at_level(logging.WARNING):
        test = src.frames("test")
    assert src.index.name == "e4e_ff.json" and "an alias of e4e" in caplog.text
    assert len(test) == 2 and set(test.video_ids) == {"e4e_ff/e4e_Fake/000_003", "e4e_ff/e4e_Real/000"}
    e4e_index("e4e")  # what DF40's protocol reads: preferred when both exist
    src = instantiate(cfg)
    assert len(src.frames("test")) == 2 and src.index.name == "e4e.json"
    (tmp_path / "data" / "dataset_json" / "e4e.json").unlink()
    (tmp_path / "data" / "dataset_json" / "e4e_ff.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"dataset_json/e4e.json, .*dataset_json/e4e_ff.json"):
        instantiate(cfg).frames("test")


def test_finetune_refuses_a_one_class_index_without_balancing(tmp_path):
    """The issue's case: DF40's CLIP recipe has balanced=false, and a per-method index with no real in train."""
    from r2m_lab.stages import run_stage
    from r2m_lab.stages.artifacts import specialist_path

    df40_method_tree(tmp_path / "data", train_reals=False, val=True)
    over = ["stage=finetune", "data=df40_method", "data.method=simswap", "backbone.recipe.balanced=false"]
    cfg = compose_config(tmp_path, over)
    with pytest.raises(ValueError, match="training split df40_simswap_ff/train has 0 real and 30 fake frames"):
        run_stage(cfg)
    assert not specialist_path(cfg, "df40_simswap_ff").exists()
