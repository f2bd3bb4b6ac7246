"""stage.screen on the real merge stage: a planted outlier specialist is named (warn), stops the merge (refuse), or is
not looked at (off); ordinary smoke specialists are not flagged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import base_path, specialist_path
from r2m_lab.weights import Checkpoint, save_detector
from tests.conftest import compose_config


@pytest.fixture
def root(trained_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained_root / "artifacts", tmp_path / "artifacts", ignore=shutil.ignore_patterns("merged"))
    return tmp_path


def plant(cfg, name: str, scale: float = 1.0, flip_head: bool = False) -> None:
    """Rewrite specialist ``name`` as θ₀ + scale·τ (and its head's real/fake rows swapped), keeping its metadata."""
    path = specialist_path(cfg, name)
    ckpt = Checkpoint(path)
    theta0 = Checkpoint(base_path(cfg)).backbone
    backbone = {k: theta0[k] + scale * (v - theta0[k]) for k, v in ckpt.backbone.items()}
    head = {k: v.flip(0) if flip_head else v for k, v in ckpt.head.items()}
    save_detector(path, backbone, head, {"kind": "specialist", "base_hash": ckpt.base_hash, "name": name})


def test_ordinary_specialists_are_not_flagged(root):
    card = run_stage(compose_config(root, ["stage=merge", "merger=average"]))
    assert card["screening"]["flags"] == [] and len(card["screening"]["families"]) == 4
    assert "| synthetic_swap |" in (root / "run" / "screening.md").read_text()


def test_a_scaled_specialist_is_flagged_then_refused(root):
    cfg = compose_config(root, ["stage=merge", "merger=average"])
    plant(cfg, "synthetic_edit", scale=10.0)
    card = run_stage(cfg)  # warn: merged anyway, the flag recorded
    assert {f["family"] for f in card["screening"]["flags"]} == {"synthetic_edit"}
    assert json.loads((root / "run" / "screening.json").read_text())["flags"][0]["statistic"] == "norm"

    refuse = compose_config(root, ["stage=merge", "merger=task_arithmetic", "stage.screen=refuse"])
    with pytest.raises(ValueError, match=r"flagged specialist\(s\) \['synthetic_edit'\]"):
        run_stage(refuse)
    assert not list((root / "artifacts" / "merged").rglob("task_arithmetic-*.safetensors")), "nothing merged"


def test_a_flipped_head_is_flagged_and_off_skips_the_pass(root):
    cfg = compose_config(root, ["stage=merge", "merger=average", "stage.screen=refuse"])
    plant(cfg, "synthetic_swap", flip_head=True)
    with pytest.raises(ValueError, match="synthetic_swap"):
        run_stage(cfg)
    report = json.loads((root / "run" / "screening.json").read_text())
    assert {f["statistic"] for f in report["flags"]} >= {"head_direction"}
    (root / "run" / "screening.json").unlink()
    card = run_stage(compose_config(root, ["stage=merge", "merger=average", "stage.screen=off"]))
    assert "screening" not in card and not (root / "run" / "screening.json").exists()


def test_a_bad_screen_mode_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="stage.screen must be one of warn, refuse, off"):
        run_stage(compose_config(tmp_path, ["stage=merge", "stage.screen=maybe"]))
    assert not (tmp_path / "artifacts").exists()


def test_screening_thresholds_are_passed_through(root):
    # a norm factor barely above 1 flags every specialist whose norm is not the median one
    cfg = compose_config(root, ["stage=merge", "merger=average", "+stage.screen_thresholds.norm_factor=1.0001"])
    card = run_stage(cfg)
    assert card["screening"]["thresholds"]["norm_factor"] == pytest.approx(1.0001)
    assert len({f["family"] for f in card["screening"]["flags"]}) >= 2
