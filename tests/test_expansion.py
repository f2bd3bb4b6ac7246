"""stage=expansion: one family added per step; only the new specialist is trained, every merger re-merges, the joint
model is retrained on the union; one evaluation; groups and cost per row."""

from __future__ import annotations

import importlib
import json

import pytest

from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import specialist_path
from r2m_lab.stages.finetune import train_detector
from r2m_lab.weights import Checkpoint
from tests.conftest import compose_config

BENCHMARK_ORDER = ["swap", "reenact", "synthesis", "edit"]
ORDER = ["edit", "swap", "reenact", "synthesis"]
UNSEEN = ["unseen/djpeg", "unseen/grid", "unseen/common"]
OVERRIDES = [
    "stage=expansion",
    "stage.mergers=[average,task_arithmetic]",
    "~stage.variants.r2m_kit",
    "+stage.select.task_arithmetic={lam:[0.2,0.6]}",
    f"stage.order=[{','.join(ORDER)}]",
]


def test_expansion_adds_one_family_per_step_against_joint_retraining(tmp_path, monkeypatch):
    cfg = compose_config(tmp_path, OVERRIDES)
    calls: list[tuple[str, str]] = []
    stamps: list[dict[str, int]] = []  # every specialist file's mtime after each training call

    def recording(run_cfg, data_cfg, kind, reuse, group=None):
        card = train_detector(run_cfg, data_cfg, kind, reuse, group)
        calls.append((kind, str(data_cfg.name)))
        stamps.append(
            {f: p.stat().st_mtime_ns for f in ORDER if (p := specialist_path(cfg, f"synthetic_{f}")).is_file()}
        )
        return card

    # the module, not the stage function r2m_lab.stages re-exports under the same name
    monkeypatch.setattr(importlib.import_module("r2m_lab.stages.expansion"), "train_detector", recording)
    metrics = run_stage(cfg)
    # each specialist trained once, when its family joins; a joint model per step on that step's union
    assert calls == [
        ("specialist", "synthetic_edit"),
        ("specialist", "synthetic_swap"),
        ("joint", "synthetic_joint-swap+edit"),
        ("specialist", "synthetic_reenact"),
        ("joint", "synthetic_joint-swap+reenact+edit"),
        ("specialist", "synthetic_synthesis"),
        ("joint", "synthetic_joint"),  # all families: the benchmark's own joint model
    ]
    for family in ORDER:  # an existing specialist is never rewritten by a later step
        assert len({s[family] for s in stamps if family in s}) == 1

    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    order = [f"{r}@{n}" for n in (2, 3, 4) for r in ("average", "task_arithmetic", "joint")]
    assert saved["row_order"] == list(metrics["models"]) == order and set(saved["rows"]) == set(order)
    assert saved["steps"] == {"2": ORDER[:2], "3": ORDER[:3], "4": ORDER}
    base_hash = saved["theta0"]["hash"]
    for label, row in saved["rows"].items():
        n = int(label.split("@")[1])
        seen = ORDER[:n]
        assert row["step"] == n and row["families"] == seen
        assert row["added"] == (ORDER[:2] if n == 2 else [ORDER[n - 1]])
        groups = row["groups"]
        assert groups["seen"] == [f"in_distribution/{f}" for f in BENCHMARK_ORDER if f in seen]
        assert groups.get("not_yet_added", []) == [f"in_distribution/{f}" for f in BENCHMARK_ORDER if f not in seen]
        assert groups["unseen"] == UNSEEN
        assert {s for sets in groups.values() for s in sets} == set(saved["models"][label]["test"])
        model = Checkpoint(saved["models"][label]["checkpoint"])
        assert model.base_hash == base_hash
        card = model.card()
        if row["kind"] == "reference":
            # the joint model of this step trained on exactly the families seen so far
            assert sorted(card["data"]["families"]) == sorted(seen)
            assert row["cost_seconds"] == card["train_seconds"] > 0
            continue
        assert sorted(card["specialists"]) == sorted(f"synthetic_{f}" for f in seen)
        train = {f: Checkpoint(specialist_path(cfg, f"synthetic_{f}")).card()["train_seconds"] for f in row["added"]}
        merge = card["selection"]["seconds"] if row["merger"] == "task_arithmetic" else card["merge_seconds"]
        assert row["cost_parts"] == {"train_seconds": train, "merge_seconds": merge}
        assert row["cost_seconds"] == pytest.approx(sum(train.values()) + merge, abs=1e-3)
        if row["merger"] == "task_arithmetic":  # chosen on the validation split of the families seen so far
            assert card["selection"]["sets"] == [f"synthetic_{f}" for f in BENCHMARK_ORDER if f in seen]
        else:
            assert "selection" not in card

    text = (tmp_path / "run" / "expansion.md").read_text()
    assert "| 4 | synthesis | joint |" in text and "| 2 | edit+swap | task_arithmetic |" in text

    # A second run reuses everything: the same costs (from the cards), nothing retrained
    calls.clear()
    stamps.clear()
    again = run_stage(compose_config(tmp_path, [*OVERRIDES, f"paths.output_dir={tmp_path}/run2"]))
    assert {label: row["cost_seconds"] for label, row in again["rows"].items()} == {
        label: row["cost_seconds"] for label, row in saved["rows"].items()
    }
    assert all(len({s[f] for s in stamps if f in s}) == 1 for f in ORDER)
    assert stamps[-1] == {f: specialist_path(cfg, f"synthetic_{f}").stat().st_mtime_ns for f in ORDER}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage.start=1"], "must be in 2..4"),
        (["stage.start=5"], "must be in 2..4"),
        (["stage.order=[swap,reenact,synthesis,nope]"], "unknown \\['nope'\\]"),
        (["stage.order=[swap,reenact,synthesis]"], "missing \\['edit'\\]"),
        (["stage.order=[swap,swap,reenact,synthesis,edit]"], "once"),
        (["stage.mergers=[nope]"], "do not exist"),
    ],
)
def test_bad_expansion_knobs_are_refused_before_training(tmp_path, overrides, message):
    cfg = compose_config(tmp_path, ["stage=expansion", *overrides])
    with pytest.raises(ValueError, match=message):
        run_stage(cfg)
    assert not (tmp_path / "artifacts").exists()  # nothing trained
