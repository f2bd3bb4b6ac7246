"""The DeepfakeBench JSON index: build, write, read back; schema errors name the key path; no silent overwrite."""

from __future__ import annotations

import copy
import json

import pytest

from r2m_lab.data.index import (
    IndexSchemaError,
    add_video,
    iter_videos,
    posix_relative,
    read_index,
    validate_index,
    video_record,
    write_index,
)


def ffpp_index() -> dict:
    """FF-DF with both compression levels, three splits, masks on the fakes only (as DeepfakeBench has them)."""
    index: dict = {}
    for label in ("FF-real", "FF-DF"):
        for split in ("train", "val", "test"):
            for comp in ("c23", "c40"):
                frames = [f"FaceForensics++/{label}/{comp}/frames/{split}0/{j:03d}.png" for j in range(3)]
                masks = [f.replace("/frames/", "/masks/") for f in frames] if label == "FF-DF" else None
                add_video(index, "FF-DF", label, split, f"{split}0", video_record(label, frames, masks), comp)
    return index


def df40_index() -> dict:
    """FSAll_ff: no compression level, test split only."""
    index: dict = {}
    for label in ("FSAll_Real", "FSAll_Fake"):
        add_video(index, "FSAll_ff", label, "test", "v0", video_record(label, [f"DF40/{label}/v0/000.png"]))
    return index


@pytest.mark.parametrize("make", [ffpp_index, df40_index])
def test_round_trip_through_writer_and_reader(tmp_path, make):
    index = make()
    path = write_index(tmp_path / "dataset_json" / "x.json", index)
    assert read_index(path) == index
    (dataset,) = index
    assert read_index(path, dataset) == index[dataset]
    assert not list(path.parent.glob(".*.tmp*")), "no temp file may be left behind"


def test_iter_videos_sees_every_level():
    rows = list(iter_videos(ffpp_index()["FF-DF"]))
    assert len(rows) == 2 * 3 * 2
    assert {(r[0], r[1], r[2]) for r in rows} >= {("FF-DF", "test", "c40"), ("FF-real", "train", "c23")}
    assert {r[2] for r in iter_videos(df40_index()["FSAll_ff"])} == {None}


def test_write_refuses_to_overwrite(tmp_path):
    path = write_index(tmp_path / "x.json", df40_index())
    before = path.read_text()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_index(path, ffpp_index())
    assert path.read_text() == before
    write_index(path, ffpp_index(), overwrite=True)
    assert "FF-DF" in read_index(path)


def test_writer_requires_relative_posix_paths(tmp_path):
    index: dict = {}
    add_video(index, "D", "real", "test", "v", video_record("real", ["a\\b\\000.png"]))
    with pytest.raises(IndexSchemaError, match=r"D/real/test/v: \"frames\" must hold POSIX paths"):
        write_index(tmp_path / "x.json", index)
    index["D"]["real"]["test"]["v"]["frames"] = ["/abs/000.png"]
    with pytest.raises(IndexSchemaError, match="relative to the data root"):
        write_index(tmp_path / "x.json", index)
    assert not (tmp_path / "x.json").exists()
    # ... while the reader accepts the Windows separators of the released files
    (tmp_path / "w.json").write_text(
        json.dumps({"D": {"real": {"test": {"v": {"label": "real", "frames": ["a\\b"]}}}}})
    )
    assert read_index(tmp_path / "w.json", "D")["real"]["test"]["v"]["frames"] == ["a\\b"]


def _break(index: dict, how: str) -> str:
    """Break ``index`` one way; return the key path (and message) the error must name."""
    videos = index["FF-DF"]["FF-real"]["train"]["c23"]
    if how == "frames_not_list":
        videos["train0"]["frames"] = "000.png"
        return 'FF-DF/FF-real/train/c23/train0: "frames" must be a list of strings'
    if how == "frames_not_strings":
        videos["train0"]["frames"] = [1, 2]
        return 'FF-DF/FF-real/train/c23/train0: "frames" must be a list of strings'
    if how == "no_frames":
        del videos["train0"]["frames"]
        return 'FF-DF/FF-real/train/c23/train0: a video record needs "frames"'
    if how == "wrong_label":
        videos["train0"]["label"] = "FF-DF"
        return 'FF-DF/FF-real/train/c23/train0: "label" must be the label it is filed under'
    if how == "bad_split":
        index["FF-DF"]["FF-real"]["training"] = index["FF-DF"]["FF-real"].pop("train")
        return "FF-DF/FF-real/training: unknown split 'training'"
    if how == "mixed_levels":
        index["FF-DF"]["FF-real"]["val"]["v9"] = {"label": "FF-real", "frames": []}
        return "FF-DF/FF-real/val: mixes compression levels"
    if how == "masks_not_list":
        index["FF-DF"]["FF-DF"]["test"]["c40"]["test0"]["masks"] = "m.png"
        return 'FF-DF/FF-DF/test/c40/test0: "masks" must be a list of strings'
    if how == "record_not_object":
        videos["train0"] = ["000.png"]
        return "FF-DF/FF-real/train/c23/train0: a video record must be an object"
    raise AssertionError(how)


BREAKS = [
    "frames_not_list",
    "frames_not_strings",
    "no_frames",
    "wrong_label",
    "bad_split",
    "mixed_levels",
    "masks_not_list",
    "record_not_object",
]


@pytest.mark.parametrize("how", BREAKS)
def test_schema_errors_name_the_key_path(tmp_path, how):
    index = copy.deepcopy(ffpp_index())
    expected = _break(index, how)
    path = tmp_path / "FF-DF.json"
    path.write_text(json.dumps(index))
    with pytest.raises(IndexSchemaError) as err:
        read_index(path)
    assert str(err.value).startswith(f"{path}: {expected}")
    with pytest.raises(IndexSchemaError, match="must hold|must be|needs|unknown|mixes"):
        write_index(tmp_path / "out.json", index)
    assert not (tmp_path / "out.json").exists()


def test_read_refuses_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_index(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(IndexSchemaError, match="bad.json: not valid JSON"):
        read_index(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(IndexSchemaError, match="<top level>"):
        read_index(tmp_path / "list.json")
    path = write_index(tmp_path / "ok.json", df40_index())
    with pytest.raises(KeyError, match=r"no dataset 'FRAll_ff'.*FSAll_ff"):
        read_index(path, "FRAll_ff")


def test_add_video_refuses_duplicates_and_mixing():
    index = df40_index()
    with pytest.raises(IndexSchemaError, match="FSAll_ff/FSAll_Real/test/v0: video already in the index"):
        add_video(index, "FSAll_ff", "FSAll_Real", "test", "v0", video_record("FSAll_Real", ["x.png"]))
    with pytest.raises(IndexSchemaError, match="either compression levels or videos"):
        add_video(index, "FSAll_ff", "FSAll_Real", "test", "v1", video_record("FSAll_Real", ["x.png"]), "c23")
    with pytest.raises(IndexSchemaError, match="unknown compression 'c99'"):
        add_video(index, "D", "L", "test", "v", video_record("L", []), "c99")
    with pytest.raises(IndexSchemaError, match='"label" must be'):
        add_video(index, "D", "L", "test", "v", video_record("other", []))
    validate_index(index)  # the refusals left it valid


def test_posix_relative(tmp_path):
    assert posix_relative(tmp_path / "a" / "b.png", tmp_path) == "a/b.png"
    with pytest.raises(ValueError, match="not inside the data root"):
        posix_relative("/elsewhere/b.png", tmp_path)
