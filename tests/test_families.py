"""stage.families: a benchmark restricted to some families (scaling, expansion), nothing the user gave dropped."""

from __future__ import annotations

import json

import pytest
from hydra.utils import instantiate

from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import specialist_path
from r2m_lab.stages.families import chosen_families, restrict_benchmark
from r2m_lab.weights import Checkpoint
from tests.conftest import compose_config


def test_restriction_moves_left_out_sets_and_trains_joint_on_the_union(tmp_path):
    cfg = compose_config(tmp_path)
    sub = restrict_benchmark(cfg, ["reenact", "swap"])  # written out of order: the benchmark's order is kept
    assert list(sub.benchmark.specialists) == list(sub.benchmark.validation) == ["swap", "reenact"]
    protocols = {p: list(sets) for p, sets in sub.benchmark.protocols.items()}
    assert protocols == {
        "in_distribution": ["swap", "reenact"],
        "in_distribution_left_out": ["synthesis", "edit"],
        "cross_domain": ["swap", "reenact"],
        "cross_domain_left_out": ["synthesis", "edit"],
        "unseen": ["djpeg", "grid", "common"],
    }
    # every test set of the full benchmark is still evaluated, under one protocol or another
    full = sorted(str(d.name) + str(d.get("domain")) for s in cfg.benchmark.protocols.values() for d in s.values())
    kept = sorted(str(d.name) + str(d.get("domain")) for s in sub.benchmark.protocols.values() for d in s.values())
    assert kept == full
    # the joint model of a subset trains on its families' training data, shared real frames once
    joint = instantiate(sub.benchmark.joint)
    assert joint.name == "synthetic_joint-swap+reenact" and joint.families == ["swap", "reenact"]
    frames = joint.frames("train")
    parts = [instantiate(sub.benchmark.specialists[k]).frames("train") for k in ("swap", "reenact")]
    assert set(frames.keys) == set(parts[0].keys) | set(parts[1].keys) and len(set(frames.keys)) == len(frames)
    # the original is untouched, and all families is the benchmark itself
    assert list(cfg.benchmark.specialists) == ["swap", "reenact", "synthesis", "edit"]
    assert restrict_benchmark(cfg, ["edit", "swap", "reenact", "synthesis"]) is cfg


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["swap", "nope"], "stage.families names \\['nope'\\]"),
        (["swap", "swap"], "lists a family twice"),
        (["swap"], "at least two families"),
        ("swap", "must be `all` or a list"),
    ],
)
def test_bad_family_lists_are_refused(tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        chosen_families(compose_config(tmp_path), value)


def test_adding_a_family_trains_only_its_specialist_and_re_merges(tmp_path):
    """The expansion step: `stage.families` grows by one; the existing specialists are reused as they are."""
    mergers = ["stage.mergers=[average]", "stage.reference_rows=[ensemble]", "~stage.variants.r2m_kit"]
    first = compose_config(tmp_path, [*mergers, "stage.families=[swap,reenact]"])
    report = run_stage(first)
    assert not specialist_path(first, "synthetic_edit").exists()
    stamps = {n: specialist_path(first, n).stat().st_mtime_ns for n in ("synthetic_swap", "synthetic_reenact")}
    out = tmp_path / "run2"
    grown = compose_config(tmp_path, [*mergers, "stage.families=[swap,reenact,edit]", f"paths.output_dir={out}"])
    again = run_stage(grown)
    assert {n: specialist_path(first, n).stat().st_mtime_ns for n in stamps} == stamps  # nothing else retrained
    assert Checkpoint(specialist_path(first, "synthetic_edit")).base_hash == report["theta0"]["hash"]
    assert again["theta0"] == report["theta0"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["families"] == ["swap", "reenact", "edit"]
    assert metrics["protocols"]["in_distribution_left_out"] == ["in_distribution_left_out/synthesis"]
    assert metrics["rows"]["average"]["kind"] == "merger" and metrics["rows"]["average"]["families"] == [
        "swap",
        "reenact",
        "edit",
    ]
    assert metrics["rows"]["specialist:edit"] == {**metrics["rows"]["specialist:edit"], "kind": "specialist"}
    assert (
        metrics["row_order"]
        == list(again["models"])
        == [
            "specialist:swap",
            "specialist:reenact",
            "specialist:edit",
            "ensemble",
            "average",
        ]
    )
    # the two merges are different checkpoints (the family set is part of the merged path)
    assert again["models"]["average"]["checkpoint"] != report["models"]["average"]["checkpoint"]
