"""The merge stage around the math: config-time refusals, validation-only selection; the pipeline's reference rows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import specialist_path
from r2m_lab.stages.pipeline import task_vector_geometry
from r2m_lab.weights import LazyStateDict, save_detector
from tests.conftest import compose_config


@pytest.fixture
def root(trained_root: Path, tmp_path: Path) -> Path:
    """A private copy of the trained specialists (θ₀, four specialists, joint), without anybody's merges."""
    shutil.copytree(trained_root / "artifacts", tmp_path / "artifacts", ignore=shutil.ignore_patterns("merged"))
    return tmp_path


# ------------------------------------------------------------------------------------------- config-time refusals
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["merger=r2m", "rank_ratio=1.5"], "rank_ratio must be a fraction in \\(0, 1\\]"),
        (["merger=r2m", "rank_ratio=0"], "rank_ratio must be a fraction"),
        (["merger=r2m", "merger.k=5"], "k=5 exceeds the number of specialists N=4"),
        (["merger=r2m", "merger.eta_mode=sideways"], "eta_mode must be one of"),
        (["merger=task_arithmetic", "merger.lam=nan"], "lam must be a finite number"),
        (["merger=ties", "merger.density=20"], "density must be a fraction"),
        (["merger=task_arithmetic", "+merger.lamda=0.5"], "merger=task_arithmetic: .*lamda"),
    ],
)
def test_bad_knobs_are_refused_before_any_checkpoint_is_read(tmp_path, overrides, message):
    # tmp_path holds no specialists at all: a refusal that came after reading would be a FileNotFoundError
    cfg = compose_config(tmp_path, ["stage=merge", *overrides])
    with pytest.raises(ValueError, match=message):
        run_stage(cfg)


def test_pipeline_checks_every_merger_before_training(tmp_path):
    cfg = compose_config(tmp_path, ["+stage.merger_overrides.r2m.rank_ratio=2.0"])
    with pytest.raises(ValueError, match="rank_ratio"):
        run_stage(cfg)
    assert not (tmp_path / "artifacts").exists(), "nothing trained before the knob check"


# ------------------------------------------------------------------------------------------- selection
def test_selection_picks_the_best_validation_auc_and_records_the_curve(root):
    grid = [0.0, 0.3, 1.0, 3.0]
    out = root / "run"
    cfg = compose_config(root, ["stage=merge", "merger=task_arithmetic", f"stage.select={{lam:{grid}}}"])
    card = run_stage(cfg)
    selection = card["selection"]
    assert selection["split"] == "val" and selection["grid"] == {"lam": grid}
    assert [point["lam"] for point in selection["curve"]] == grid
    aucs = [point["val_auc"] for point in selection["curve"]]
    assert selection["chosen"] == {"lam": grid[int(np.argmax(aucs))]}
    assert card["hparams"] == {"lam": selection["chosen"]["lam"]}
    assert selection["at_grid_edge"] == (["lam"] if selection["chosen"]["lam"] in (grid[0], grid[-1]) else [])
    # λ = 0 is θ₀ with the averaged head and λ = 3 an extrapolation: the grid really spans different models
    assert len(set(np.round(aucs, 6))) > 1
    assert (out / "plots" / "selection_task_arithmetic.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "metrics.json").read_text())["selection"]["chosen"] == selection["chosen"]

    # the saved winner, evaluated independently by stage=evaluate, has the validation AUC the curve recorded
    chosen = selection["chosen"]["lam"]
    cfg = compose_config(
        root, ["stage=evaluate", "merger=task_arithmetic", f"merger.lam={chosen}", f"paths.output_dir={root}/eval"]
    )
    report = run_stage(cfg)
    (label,) = report["models"]
    assert report["models"][label]["validation"]["frame"]["auc"] == pytest.approx(max(aucs), abs=1e-9)


def test_selection_is_reused_when_nothing_changed(root):
    overrides = ["stage=merge", "merger=task_arithmetic", "stage.select={lam:[0.1,0.5]}"]
    first = run_stage(compose_config(root, overrides))
    path = Path(first["checkpoint_path"])
    stamp = path.stat().st_mtime_ns
    from r2m_lab.stages.merge import select_and_merge

    cfg = compose_config(root, overrides)
    plot = root / "run" / "plots" / "selection_task_arithmetic.png"
    plot.unlink()
    again = select_and_merge(cfg, cfg.merger, {"lam": [0.1, 0.5]}, reuse=True)
    assert again["selection"] == first["selection"] and path.stat().st_mtime_ns == stamp
    assert plot.read_bytes()[:4] == b"\x89PNG", "a reused selection still draws its curve in this run's folder"


def test_selections_share_one_validation_decode_and_refuse_a_scorer_of_other_frames(root):
    """A scorer passed in is reused across mergers (one decode) and gives the curve a fresh one gives."""
    from r2m_lab.evaluation.scoring import UniqueFrameScorer
    from r2m_lab.stages.merge import select_and_merge, validation_frames, validation_scorer

    cfg = compose_config(root, ["stage=merge", "merger=task_arithmetic"])
    scorer = validation_scorer(cfg)
    shared = select_and_merge(cfg, cfg.merger, {"lam": [0.1, 0.5]}, scorer=scorer)
    select_and_merge(cfg, cfg.merger, {"lam": [0.2]}, scorer=scorer)
    assert scorer.decoded == len(scorer), "three grid points of two selections: the frames decoded once"
    fresh = select_and_merge(
        compose_config(root, ["stage=merge", "merger=task_arithmetic"]), cfg.merger, {"lam": [0.1, 0.5]}
    )
    assert shared["selection"]["curve"] == fresh["selection"]["curve"]
    val = validation_frames(cfg)
    other = UniqueFrameScorer({"validation": val.subset(np.arange(len(val) - 1))}, 8)
    with pytest.raises(ValueError, match="built on other frames than the val split"):
        select_and_merge(cfg, cfg.merger, {"lam": [0.1]}, scorer=other)


@pytest.mark.parametrize("split", ["test", "unseen", "train"])
def test_selection_refuses_any_split_but_validation(root, split):
    cfg = compose_config(
        root, ["stage=merge", "merger=task_arithmetic", "stage.select={lam:[0.3]}", f"stage.select_split={split}"]
    )
    with pytest.raises(ValueError, match="in-distribution validation split only"):
        run_stage(cfg)


def test_selection_refuses_validation_sets_outside_the_specialists_families(root):
    cfg = compose_config(
        root,
        [
            "stage=merge",
            "merger=task_arithmetic",
            "stage.select={lam:[0.3]}",
            "benchmark.validation=${benchmark.protocols.unseen}",
        ],
    )
    with pytest.raises(ValueError, match="never at cross-domain or unseen sets"):
        run_stage(cfg)


def test_selection_refuses_unknown_parameters_and_bad_grid_values(root):
    cfg = compose_config(root, ["stage=merge", "merger=task_arithmetic", "stage.select={eta:[1.0]}"])
    with pytest.raises(ValueError, match="no hyper-parameter\\(s\\) \\['eta'\\]"):
        run_stage(cfg)
    cfg = compose_config(root, ["stage=merge", "merger=r2m", "stage.select={rank_ratio:[0.1,1.5]}"])
    with pytest.raises(ValueError, match="rank_ratio must be a fraction"):
        run_stage(cfg)
    assert not (root / "artifacts" / "merged").exists(), "the whole grid is checked before the first merge"


def test_pipeline_selects_each_grid_on_validation(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            "stage.mergers=[average,task_arithmetic]",
            "+stage.select.task_arithmetic={lam:[0.2,0.6]}",
            "stage.reference_rows=[ensemble]",
            "~stage.variants.r2m_kit",
        ],
    )
    report = run_stage(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["merges"]["task_arithmetic"]["selection"]["grid"] == {"lam": [0.2, 0.6]}
    assert "selection" not in metrics["merges"]["average"]
    assert "joint" not in report["models"] and not specialist_path(cfg, "synthetic_joint").exists()
    assert "joint" not in metrics["reference_rows"] and metrics["reference_rows"]["ensemble"]["reduction"] == "mean"
    assert list(report["models"])[-3:] == ["ensemble", "average", "task_arithmetic"]


def test_pipeline_refuses_a_grid_for_a_merger_it_does_not_run(tmp_path):
    cfg = compose_config(tmp_path, ["stage.mergers=[average]", "+stage.select.r2m={eta:[1.0]}"])
    with pytest.raises(ValueError, match="~stage.select.r2m"):
        run_stage(cfg)
    assert not (tmp_path / "artifacts").exists(), "nothing trained before the check"


# ------------------------------------------------------------------------------------------- reference rows
def test_joint_geometry_relates_the_joint_task_vector_to_every_specialist():
    theta0 = {"w": torch.zeros(2, 2), "n": torch.tensor(3)}
    specialists = {
        "a": {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "n": torch.tensor(3)},
        "b": {"w": torch.tensor([[0.0, 2.0], [0.0, 0.0]]), "n": torch.tensor(3)},
    }
    joint_state = {"w": torch.tensor([[1.0, 1.0], [0.0, 0.0]]), "n": torch.tensor(3)}
    names, cosines, facts = task_vector_geometry(theta0, specialists, joint_state)
    assert names == ["a", "b"] and cosines == [[1.0, 0.0], [0.0, 1.0]]
    cos = facts["cosine_with_joint"]
    assert cos["a"] == pytest.approx(2**-0.5) and cos["b"] == pytest.approx(2**-0.5)
    assert facts["joint_task_vector_norm"] == pytest.approx(2**0.5)
    assert facts["task_vector_norms"] == {"a": pytest.approx(1.0), "b": pytest.approx(2.0)}
    assert task_vector_geometry(theta0, specialists)[2] is None
    with pytest.raises(ValueError, match="missing keys"):
        task_vector_geometry(theta0, specialists, {"w": joint_state["w"]})
    with pytest.raises(ValueError, match="reserved for the joint model"):
        task_vector_geometry(theta0, {"joint": specialists["a"]}, joint_state)


def test_reference_rows_are_not_mergers(tmp_path):
    for row in ("ensemble", "joint"):
        with pytest.raises(Exception, match="Available options"):
            compose_config(tmp_path, ["stage=merge", f"merger={row}"])


def test_evaluate_ensemble_is_the_mean_of_the_specialists_scores(root):
    out = root / "run"
    report = run_stage(compose_config(root, ["stage=evaluate", "stage.model=ensemble"]))
    members = [m for m in report["models"] if m.startswith("specialist:")]
    assert len(members) == 4 and "ensemble" in report["models"]

    def scores(model: str) -> np.ndarray:
        path = out / "scores" / model.replace(":", "-") / "unseen__grid.csv"
        with path.open() as fh:
            return np.array([float(row["score"]) for row in csv.DictReader(fh)])

    expected = np.mean([scores(m) for m in members], axis=0)
    np.testing.assert_allclose(scores("ensemble"), expected, rtol=1e-12)


def test_evaluate_the_joint_model(root):
    report = run_stage(compose_config(root, ["stage=evaluate", "stage.model=joint"]))
    assert list(report["models"]) == ["joint"]


# ------------------------------------------------------------------------------------------- lazy reading
def test_lazy_state_dict_reads_per_key_and_lands_on_the_device(tmp_path):
    path = tmp_path / "m.safetensors"
    save_detector(
        path,
        {"a": torch.arange(4.0), "b": torch.ones(2, 2)},
        {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)},
        {"kind": "x"},
    )
    lazy = LazyStateDict(path, device="cpu")
    assert list(lazy) == ["a", "b"] and lazy.metadata()["kind"] == "x"
    assert torch.equal(lazy["a"], torch.arange(4.0)) and lazy["a"].device.type == "cpu"
    # no handle is held between reads: the file can be replaced and the next read sees the new content
    save_detector(
        path,
        {"a": torch.zeros(4), "b": torch.ones(2, 2)},
        {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)},
        {"kind": "x"},
    )
    assert torch.equal(lazy["a"], torch.zeros(4))


def test_merge_then_evaluate_in_one_job(root):
    out = root / "run"
    report = run_stage(compose_config(root, ["stage=merge", "merger=average", "stage.evaluate=true"]))
    assert list(report["models"]) == ["average"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["merge"]["merger"] == "average" and "in_distribution" in metrics["protocols"]
    assert (out / "results.md").is_file()
