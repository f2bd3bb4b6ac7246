"""stage=scaling: every family subset (or the documented cyclic windows), chosen on the subset's own validation, one
evaluation on the full benchmark, row groups, merge time and peak memory against N."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import base_path
from r2m_lab.stages.scaling import family_subsets, hydra_value, merger_overrides, row_groups
from r2m_lab.weights import Checkpoint
from tests.conftest import compose_config

FAMILIES = ["swap", "reenact", "synthesis", "edit"]  # the synthetic benchmark's order
UNSEEN = ["unseen/djpeg", "unseen/grid", "unseen/common"]


def test_subsets_are_all_combinations_or_the_cyclic_windows():
    assert [family_subsets(FAMILIES, n, 10) for n in (2, 3, 4)] == [
        ([list(c) for c in itertools.combinations(FAMILIES, n)], "all") for n in (2, 3, 4)
    ]
    assert [len(family_subsets(FAMILIES, n, 10)[0]) for n in (2, 3, 4)] == [6, 4, 1]
    assert family_subsets(FAMILIES, 2, 6)[1] == "all"  # exactly at the cap: still every subset
    windows, how = family_subsets(FAMILIES, 2, 3)
    assert windows == [["swap", "reenact"], ["reenact", "synthesis"], ["synthesis", "edit"]] and "cyclic" in how
    # a window that wraps around is written in the benchmark's order (the same merged path whatever the order)
    assert family_subsets(FAMILIES, 3, 3)[0][2] == ["swap", "synthesis", "edit"]
    five = list("abcde")
    windows, _ = family_subsets(five, 2, 10)  # C(5,2) = 10: all
    assert len(windows) == 10
    windows, _ = family_subsets(five, 3, 9)  # C(5,3) = 10 > 9: K = 5 windows, all distinct, each family 3 times
    assert len({tuple(w) for w in windows}) == 5 and windows[-1] == ["a", "b", "e"]
    assert all(sum(f in w for w in windows) == 3 for f in five)


def test_merger_overrides_compose_the_merge_at_its_hparams():
    hparams = {"k": 1, "rank_ratio": 0.1, "eta_mode": "core_norm", "norm_matching": True, "lam": None, "g": [1, 2]}
    assert merger_overrides(hparams) == [
        "merger.k=1",
        "rank_ratio=0.1",  # r2m's and cart's YAML read the top-level alias
        "merger.eta_mode=core_norm",
        "merger.norm_matching=true",
        "merger.lam=null",
        "merger.g=[1,2]",
    ]
    assert hydra_value("a b") == "'a b'"


def test_scaling_merges_every_subset_on_its_own_validation_and_scores_once(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            "stage=scaling",
            "stage.mergers=[task_arithmetic]",
            "~stage.variants.r2m_kit",
            "+stage.select.task_arithmetic={lam:[0.2,0.6]}",
            "stage.measure_memory=false",
        ],
    )
    metrics = run_stage(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    subsets = {n: [list(c) for c in itertools.combinations(FAMILIES, n)] for n in (2, 3, 4)}
    assert saved["subsets"] == {str(n): s for n, s in subsets.items()}  # 6 + 4 + 1
    assert saved["subset_choice"] == {"2": "all", "3": "all", "4": "all"}
    order = [f"specialist:{f}" for f in FAMILIES]
    order += [f"{m}@{'+'.join(s)}" for n in (2, 3, 4) for s in subsets[n] for m in ("task_arithmetic",)]
    assert saved["row_order"] == list(metrics["models"]) == order
    assert set(saved["rows"]) == set(order) and saved["stage"] == "scaling"
    assert saved["theta0"]["hash"] == Checkpoint(base_path(cfg)).base_hash

    for label, row in saved["rows"].items():
        fams = row["families"]
        groups = row["groups"]
        assert row["n"] == len(fams) == (1 if row["kind"] == "specialist" else len(label.split("@")[1].split("+")))
        assert groups["merged"] == [f"in_distribution/{f}" for f in FAMILIES if f in fams]
        assert groups.get("left_out", []) == [f"in_distribution/{f}" for f in FAMILIES if f not in fams]
        assert groups["unseen"] == UNSEEN
        assert groups["cross"] == [f"cross_domain/{f}" for f in FAMILIES if f in fams]
        # every group's set was scored for this row, in the one evaluation on the full benchmark's sets
        scored = set(saved["models"][label]["test"])
        assert {s for sets in groups.values() for s in sets} == scored
        assert not any("left_out" in p for p in saved["protocols"])
        if row["kind"] == "merger":
            assert row["merger"] == row["row"] == label.split("@")[0] and row["merge_seconds"] > 0
            assert row["peak_memory_bytes"] is None  # stage.measure_memory=false

    # each merger chose its λ on the validation split of the subset's own families only
    for s in subsets[2] + subsets[3]:
        selection = saved["merges"][f"task_arithmetic@{'+'.join(s)}"]["selection"]
        assert selection["sets"] == [f"synthetic_{f}" for f in s]
        assert selection["chosen"]["lam"] in (0.2, 0.6) and selection["seconds"] > 0
    # one merged checkpoint per subset and merger
    merged = [saved["models"][label]["checkpoint"] for label in order[4:]]
    assert len(set(merged)) == len(merged) == 11

    text = (tmp_path / "run" / "scaling.md").read_text()
    for merger in ("task_arithmetic",):
        assert f"## {merger}" in text
        # N = 4: one subset, nothing left out; the merged mean is that row's mean AUC over the 4 in-distribution sets
        label = f"{merger}@{'+'.join(FAMILIES)}"
        test = saved["models"][label]["test"]
        mean = np.mean([test[f"in_distribution/{f}"]["frame"]["auc"] for f in FAMILIES])
        unseen = np.mean([test[s]["frame"]["auc"] for s in UNSEEN])
        assert f"| 4 | 1 | {mean:.3f} |  | {unseen:.3f} |" in text
    assert "| 2 | 6 |" in text and "| 3 | 4 |" in text and "| 1 | 4 |" in text  # the specialists are N = 1


def test_a_capped_size_takes_the_cyclic_windows_and_peak_memory_is_measured(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            "stage=scaling",
            "stage.mergers=[r2m]",
            "~stage.variants.r2m_kit",
            "+stage.select.r2m=null",  # r2m at its config values: rank_ratio from the top-level alias
            "stage.sizes=[3]",
            "stage.max_subsets=2",
        ],
    )
    saved = run_stage(cfg)
    # C(4, 3) = 4 > 2 subsets: the first two cyclic windows of the family order (each merger's memory is measured on
    # the first subset of each size: a fresh interpreter per measurement is seconds, so one size here)
    assert saved["sizes"] == [3] and saved["subsets"] == {"3": [FAMILIES[:3], FAMILIES[1:]]}
    assert "cyclic windows" in saved["subset_choice"]["3"]
    measured = {"r2m@swap+reenact+synthesis"}
    assert set(saved["memory"]) == measured
    for label, row in saved["rows"].items():
        if label in measured:
            # a fresh interpreter holding torch and the merge: more than 50 MB, less than this machine has
            assert 50e6 < row["peak_memory_bytes"] < 1e12
            assert saved["memory"][label]["peak_memory_bytes"] == row["peak_memory_bytes"]
            overrides = saved["memory"][label]["overrides"]
            assert "rank_ratio=0.1" in overrides and "merger.k=1" in overrides
        else:
            assert row["peak_memory_bytes"] is None
    lines = (tmp_path / "run" / "scaling.md").read_text().splitlines()
    (line,) = [t for t in lines if t.startswith("| 3 |")]  # r2m's N = 3 line (the specialists are N = 1)
    assert line.endswith(f"| {saved['rows']['r2m@swap+reenact+synthesis']['peak_memory_bytes'] / 1e6:.0f} |")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage.sizes=[1,2]"], "outside 2..4"),
        (["stage.sizes=[2,5]"], "outside 2..4"),
        (["stage.sizes=[2,2]"], "lists a size twice"),
        (["stage.max_subsets=0"], "at least 1"),
        (["stage.mergers=[nope]"], "do not exist"),
    ],
)
def test_bad_scaling_knobs_are_refused_before_training(tmp_path, overrides, message):
    cfg = compose_config(tmp_path, ["stage=scaling", *overrides])
    with pytest.raises(ValueError, match=message):
        run_stage(cfg)
    assert not (tmp_path / "artifacts").exists()  # nothing trained


def test_groups_follow_each_benchmarks_protocols(tmp_path):
    """DF40's cross-dataset sets are one per family (the row's own go to `cross`); FF++'s are not any family's, so
    every row gets them alike under the protocol's name; FF++ has no unseen protocol."""
    df40 = compose_config(tmp_path, ["benchmark=df40"])
    assert row_groups(df40, ["fs", "efs"]) == {
        "merged": ["in_distribution/fs", "in_distribution/efs"],
        "left_out": ["in_distribution/fr"],
        "unseen": [f"unseen/{k}" for k in df40.benchmark.protocols.unseen],
        "cross": ["cross_dataset/fs", "cross_dataset/efs"],
        "cross_left_out": ["cross_dataset/fr"],
    }
    ffpp = compose_config(tmp_path, ["benchmark=ffpp"])
    assert row_groups(ffpp, ["df", "f2f"], inside="seen", outside="not_yet_added") == {
        "seen": ["in_distribution/df", "in_distribution/f2f"],
        "not_yet_added": ["in_distribution/fs", "in_distribution/nt"],
        "cross_dataset": ["cross_dataset/celebdf_v2", "cross_dataset/dfd", "cross_dataset/dfdc", "cross_dataset/dfdcp"],
    }
