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


# --- validation limited to what is read; every problem named by its key path ----------------------------------------


def dfdc_like_index() -> dict:
    """DFDC as DeepfakeBench's rearrange.py writes it: ``val`` holds one video's record instead of {video: record}."""
    index: dict = {"DFDC": {}}
    for label in ("DFDC_Real", "DFDC_Fake"):
        record = video_record(label, [f"DFDC/test/frames/{label}0/000.png"])
        index["DFDC"][label] = {"train": {}, "test": {f"{label}0": record}, "val": dict(record)}
    return index


def test_problems_outside_the_splits_read_are_returned_not_raised(tmp_path):
    index = dfdc_like_index()
    problems = validate_index(index, splits=["test"])
    assert [str(p) for p in problems] == [
        f"DFDC/{label}/val: a split must be an object {{video: record}}, found a single video record in its place"
        for label in ("DFDC_Real", "DFDC_Fake")
    ]
    assert {p.split for p in problems} == {"val"}
    with pytest.raises(IndexSchemaError, match=r"^DFDC/DFDC_Real/val: a split must be an object"):
        validate_index(index, splits=["test", "val"])
    with pytest.raises(IndexSchemaError, match="DFDC/DFDC_Real/val"):
        validate_index(index)  # every split: the strict whole-file check is unchanged
    path = tmp_path / "DFDC.json"
    path.write_text(json.dumps(index))
    assert list(read_index(path, "DFDC", splits=["test"])) == ["DFDC_Real", "DFDC_Fake"]
    assert [r[3] for r in iter_videos(read_index(path, "DFDC", splits=["test"]), ["test"])] == [
        "DFDC_Real0",
        "DFDC_Fake0",
    ]


def test_every_broken_node_is_listed_with_its_key_path():
    from r2m_lab.data.index import index_problems

    index = copy.deepcopy(ffpp_index())
    index["FF-DF"]["FF-real"]["train"]["c23"]["train0"]["frames"] = "000.png"
    index["FF-DF"]["FF-DF"]["test"]["c40"]["test0"]["label"] = "FF-real"
    index["Other"] = []
    problems = index_problems(index, source="FF-DF.json")
    assert [str(p) for p in problems] == [
        'FF-DF.json: FF-DF/FF-real/train/c23/train0: "frames" must be a list of strings',
        "FF-DF.json: FF-DF/FF-DF/test/c40/test0: \"label\" must be the label it is filed under ('FF-DF'), "
        "got 'FF-real'",
        "FF-DF.json: Other: a dataset is a non-empty object {label: {split: ...}}",
    ]
    # reading FF-DF's val only: nothing read is broken, the three are returned (another dataset's too)
    assert len(validate_index(index, splits=["val"], dataset="FF-DF")) == 3
    # a broken label node is above the splits: fatal whatever split is read
    index["FF-DF"]["FF-real"] = ["not", "a", "mapping"]
    with pytest.raises(IndexSchemaError, match="FF-DF/FF-real: a label is an object"):
        validate_index(index, splits=["val"], dataset="FF-DF")


# --- frame paths as released files write them -----------------------------------------------------------------------


def test_path_resolver_rules(tmp_path):
    from r2m_lab.data.index import FramePathResolver

    root = tmp_path / "data"
    frame = root / "FaceForensics++" / "original_sequences" / "youtube" / "c23" / "frames" / "000" / "000.png"
    frame.parent.mkdir(parents=True)
    frame.write_bytes(b"png")
    (root / "000.png").write_bytes(b"stray")  # a file at the root must never match a foreign path by name alone
    elsewhere = tmp_path / "elsewhere" / "x" / "001.png"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_bytes(b"png")
    r = FramePathResolver(root)
    rel = "FaceForensics++/original_sequences/youtube/c23/frames/000/000.png"
    assert r.locate(rel) == (str(frame), True)
    assert r.locate(rel.replace("/", "\\")) == (str(frame), True)
    assert r.locate(str(elsewhere)) == (str(elsewhere), True)  # absolute, exists as given: used as given
    for foreign in (
        "C:\\data\\" + rel.replace("/", "\\"),  # Windows drive letter
        "/home/someone/datasets/" + rel,  # an absolute root of another machine
        "./datasets\\" + rel.replace("/", "\\"),  # relative to another folder
    ):
        assert r.locate(foreign) == (str(frame), True), foreign
    assert r.locate("C:\\data\\nothing\\000.png") == ("C:\\data\\nothing\\000.png", False)
    assert r.locate("/gone/000/000.png") == ("/gone/000/000.png", False)
    assert r.locate("gone/000.png") == (str(root / "gone" / "000.png"), False)
