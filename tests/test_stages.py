"""Stage functions in-process on the smoke preset: finetune → merge → evaluate → pipeline, and their refusals."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from r2m_lab.mergers import merger_names
from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import base_path, merged_path, specialist_path
from r2m_lab.weights import Checkpoint, save_detector
from tests.conftest import compose_config
from tests.test_report import rank_auc


def test_specialists_share_theta0_and_head_init(trained_root):
    cfg = compose_config(trained_root)
    base = Checkpoint(base_path(cfg))
    assert set(base.card()["pretext_metrics"]) >= {"train/loss", "train/acc"}
    for data_cfg in cfg.benchmark.specialists.values():
        ckpt = Checkpoint(specialist_path(cfg, data_cfg.name))
        card = ckpt.card()
        assert ckpt.base_hash == base.base_hash == card["base_hash"]
        assert card["kind"] == "specialist" and card["name"] == data_cfg.name
        assert 0.0 <= card["val_metrics"]["frame"]["auc"] <= 1.0
        assert set(card["recipe"]) >= {"optimizer", "batch_size", "max_steps"}
        # fine-tuning moved the weights away from θ₀
        key = "blocks.0.mlp.fc1.weight"
        assert not torch.equal(ckpt.backbone[key], base.backbone[key])
    joint = Checkpoint(specialist_path(cfg, cfg.benchmark.joint.name)).card()
    assert joint["kind"] == "joint"
    # the joint model sees every family as often as a specialist sees its own
    assert joint["max_steps"] == 4 * cfg.backbone.recipe.max_steps


def test_finetune_stage_writes_card_and_metrics(tmp_path):
    cfg = compose_config(tmp_path, ["stage=finetune", "data=synthetic_edit"])
    card = run_stage(cfg)
    path = specialist_path(cfg, "synthetic_edit")
    assert path.is_file() and path.with_suffix(".json").is_file() and path.with_suffix(".md").is_file()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["fingerprint"] == card["fingerprint"]
    assert not list(path.parent.glob(".*.tmp")), "no temp file may be left behind"


def test_merge_and_evaluate_stages(trained_root, tmp_path):
    out = tmp_path / "merge_run"
    cfg = compose_config(trained_root, ["stage=merge", "merger=task_arithmetic", f"paths.output_dir={out}"])
    card = run_stage(cfg)
    merged = Checkpoint(merged_path(cfg, cfg.merger))
    assert card["merger"] == "task_arithmetic" and card["hparams"] == {"lam": 0.3}
    assert merged.base_hash == Checkpoint(base_path(cfg)).base_hash
    assert set(card["specialists"]) == {d.name for d in cfg.benchmark.specialists.values()}

    out = tmp_path / "eval_run"
    cfg = compose_config(trained_root, ["stage=evaluate", "merger=task_arithmetic", f"paths.output_dir={out}"])
    report = run_stage(cfg)
    (label,) = report["models"]
    tests = report["models"][label]["test"]
    assert set(tests) == {n for names in report["protocols"].values() for n in names}
    for name, metrics in tests.items():
        assert set(metrics) == {"frame", "video"}
        # the AUC is the one of the scores written beside it (an independent rank count), not merely a number
        with (out / "scores" / label.replace(":", "-") / f"{name.replace('/', '__')}.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        scores, labels = np.array([float(r["score"]) for r in rows]), np.array([int(r["label"]) for r in rows])
        assert metrics["frame"]["auc"] == pytest.approx(rank_auc(scores, labels), abs=1e-6), name
    assert (out / "metrics.json").is_file() and (out / "results.md").is_file()
    assert (out / "table_auc_frame.csv").is_file() and (out / "plots" / "auc_frame.png").is_file()
    assert list((out / "scores").rglob("*.csv"))


def test_r2m_merge_with_rank_ratio_alias(trained_root, tmp_path):
    cfg = compose_config(trained_root, ["stage=merge", "merger=r2m", "rank_ratio=0.5", f"paths.output_dir={tmp_path}"])
    card = run_stage(cfg)
    assert card["hparams"]["rank_ratio"] == 0.5
    assert merged_path(cfg, cfg.merger).is_file()


def test_merge_refuses_missing_specialists_with_the_command_to_run(tmp_path):
    cfg = compose_config(tmp_path, ["stage=merge", "train_missing=false"])  # debug=smoke would train them
    with pytest.raises(FileNotFoundError) as err:
        run_stage(cfg)
    assert "python -m r2m_lab stage=finetune data=synthetic_swap" in str(err.value)


def test_merge_refuses_specialists_from_another_theta0(trained_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(trained_root / "artifacts", root / "artifacts")
    cfg = compose_config(root, ["stage=merge"])
    path = specialist_path(cfg, "synthetic_edit")
    ckpt = Checkpoint(path)
    save_detector(path, ckpt.backbone_state(), ckpt.head, {**ckpt.metadata, "base_hash": "f" * 64})
    with pytest.raises(ValueError, match="synthetic_edit"):
        run_stage(cfg)


def test_finetune_on_missing_real_data_fails_fast_naming_the_index(tmp_path):
    cfg = compose_config(tmp_path, ["stage=finetune", "data=faceforensics_df"])
    with pytest.raises(FileNotFoundError) as err:
        run_stage(cfg)
    message = str(err.value)
    assert str(tmp_path / "data" / "dataset_json" / "FF-DF.json") in message
    assert "DeepfakeBench" in message and "paths.data_dir" in message
    assert not (tmp_path / "artifacts").exists(), "no θ₀ work before the data check"


def test_pipeline_end_to_end_and_reuse(tmp_path):
    cfg = compose_config(tmp_path)
    report = run_stage(cfg)
    out = tmp_path / "run"
    rows = list(report["models"])
    assert rows[:4] == [f"specialist:{k}" for k in cfg.benchmark.specialists]
    # every merger in conf/merger/ (stage.mergers: all), R²M followed by its fixed-setting variant
    assert rows[4:] == ["joint", "ensemble", *[m for n in merger_names() for m in (n, "r2m_kit")[: 1 + (n == "r2m")]]]
    metrics = json.loads((out / "metrics.json").read_text())
    cos = np.array(metrics["task_vector_cosines"]["matrix"])
    assert cos.shape == (4, 4) and np.allclose(np.diag(cos), 1.0, atol=1e-5)
    for model, result in metrics["models"].items():
        assert 0.0 <= result["threshold"] <= 1.0, model
    text = (out / "results.md").read_text()
    assert "| model" in text and "r2m" in text and "Task-vector cosines" in text
    for png in ("auc_frame.png", "auc_video.png", "task_vector_cosines.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "plots").glob("roc_*.png"))
    # a second run reuses every artifact (same fingerprints): no specialist file is rewritten
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts").rglob("*.safetensors")}
    again = run_stage(compose_config(tmp_path, [f"paths.output_dir={tmp_path}/run2"]))
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    first = report["models"]["average"]["test"]["in_distribution/swap"]["frame"]["auc"]
    assert again["models"]["average"]["test"]["in_distribution/swap"]["frame"]["auc"] == pytest.approx(first)


def test_killed_save_leaves_no_partial_artifact(tmp_path, monkeypatch):
    import r2m_lab.weights as weights

    target = tmp_path / "a" / "model.safetensors"

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_detector(target, {"w": torch.zeros(2)}, {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, {})
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("model", ["joint", "specialist:synthetic_swap"])
def test_evaluate_any_trained_model(trained_root, tmp_path, model):
    cfg = compose_config(trained_root, ["stage=evaluate", f"stage.model={model}", f"paths.output_dir={tmp_path}"])
    report = run_stage(cfg)
    assert list(report["models"]) == [model]
    name = cfg.benchmark.joint.name if model == "joint" else model.split(":", 1)[1]
    assert report["models"][model]["checkpoint"] == str(specialist_path(cfg, name))
    # one row in the summary table and one in each protocol's table, beyond the title line that names the model
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0] == f"# {model} on synthetic"
    assert sum(line.startswith(f"| {model} |") for line in lines) == 1 + len(cfg.benchmark.protocols)


def test_evaluate_names_the_command_for_a_missing_model(tmp_path):
    cfg = compose_config(tmp_path, ["stage=evaluate", "stage.model=specialist:synthetic_grid"])
    with pytest.raises(FileNotFoundError, match="stage=finetune data=synthetic_grid"):
        run_stage(cfg)


def test_training_is_repeatable_under_a_fixed_seed(tmp_path):
    """Two independent runs (θ₀ pretext included) give bit-identical weights; another seed does not."""
    from r2m_lab.stages.finetune import train_detector
    from r2m_lab.weights import state_dict_hash

    hashes = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = compose_config(tmp_path / run, [f"seed={seed}"])
        train_detector(cfg, cfg.benchmark.specialists.swap, kind="specialist", reuse=False)
        hashes[run] = state_dict_hash(Checkpoint(specialist_path(cfg, "synthetic_swap")).backbone_state())
    assert hashes["a"] == hashes["b"]
    assert hashes["a"] != hashes["c"]


def test_side_by_side_finetunes_write_the_weights_of_one_after_the_other(tmp_path):
    """The pipeline's spawned single-thread fine-tunes give bit-identical specialists to in-process training."""
    from r2m_lab.stages.finetune import train_detector
    from r2m_lab.stages.pipeline import train_side_by_side
    from r2m_lab.weights import state_dict_hash

    alone = compose_config(tmp_path / "alone", ["threads=1"])
    assert torch.get_num_threads() == 1  # as the workers (tests/conftest.py sets it)
    keys = list(alone.benchmark.specialists)[:2]
    for key in keys:
        train_detector(alone, alone.benchmark.specialists[key], kind="specialist", reuse=False)
    side = compose_config(tmp_path / "side", ["threads=1"])
    side.benchmark.specialists = {k: side.benchmark.specialists[k] for k in keys}
    base_path(side).parent.mkdir(parents=True)
    shutil.copy(base_path(alone), base_path(side))  # the same θ₀, not pretrained twice
    shutil.copy(base_path(alone).with_suffix(".json"), base_path(side).with_suffix(".json"))
    timings: dict[str, float] = {}
    train_side_by_side(side, joint=False, reuse=False, group="g", workers=2, threads=1, timings=timings)
    assert set(timings) == {f"finetune/{k}" for k in keys}
    for key in keys:
        name = alone.benchmark.specialists[key].name
        a, b = (Checkpoint(specialist_path(c, name)) for c in (alone, side))
        assert state_dict_hash(a.backbone_state()) == state_dict_hash(b.backbone_state()), key
        assert torch.equal(a.head["weight"], b.head["weight"])


CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("overrides", "smoke", "jobs", "expected"),
    [
        (["threads=1"], True, 5, (min(5, CORES), 1) if CORES > 1 else (1, None)),
        (["threads=1"], True, 1, (1, None)),
        ([f"threads={CORES}"], True, 5, (1, None)),
        (["threads=1", "trainer=ddp"], True, 5, (1, None)),
        # auto: the tiny ViT's fine-tunes go side by side, one thread each; smoke-sized and CLIP ones do not
        (["threads=auto"], False, 5, (min(5, CORES), 1) if CORES > 1 else (1, None)),
        (["threads=auto"], False, 1, (1, None)),
        (["threads=auto"], True, 5, (1, None)),
        (["threads=auto", "backbone=clip_vit_b16"], False, 5, (1, None)),
        (["threads=auto", "trainer=ddp"], False, 5, (1, None)),
    ],
)
def test_finetune_lanes(tmp_path, overrides, smoke, jobs, expected):
    from r2m_lab.stages.pipeline import finetune_lanes

    cfg = compose_config(tmp_path, overrides, smoke=smoke)
    assert finetune_lanes(cfg, jobs) == ((1, None) if torch.cuda.is_available() else expected)
