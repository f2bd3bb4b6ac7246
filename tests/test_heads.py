"""stage=heads: every head variant is what it claims, the refit sees validation frames only, the table's rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from r2m_lab.data.sources import FrameSet, SyntheticSource
from r2m_lab.evaluation import head_refit
from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import specialist_path
from r2m_lab.stages.heads import head_checkpoint, variant_path
from r2m_lab.stages.merge import validation_frames
from r2m_lab.weights import Checkpoint
from tests.conftest import compose_config

FAMILIES = ["swap", "reenact"]
MERGERS = ["average", "task_arithmetic"]
CS = [0.01, 1.0]
OVERRIDES = [
    "stage=heads",
    f"stage.families=[{','.join(FAMILIES)}]",
    f"stage.mergers=[{','.join(MERGERS)}]",
    "+stage.select.task_arithmetic={lam:[0.3,0.6]}",
    f"stage.refit.Cs=[{','.join(map(str, CS))}]",
]
HEADS = ["average", *[f"specialist:{f}" for f in FAMILIES], "refit"]


class FakeOnlySource(SyntheticSource):
    """A synthetic family whose frames are its fakes only: a validation split with one class."""

    def frames(self, split: str) -> FrameSet:
        frames = super().frames(split)
        return frames.subset(np.flatnonzero(frames.labels == 1))


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory: pytest.TempPathFactory):
    """One smoke stage=heads run (two families, two mergers), the frames the refit featurised recorded."""
    root = tmp_path_factory.mktemp("heads")
    cfg = compose_config(root, OVERRIDES)
    featurised: list[tuple[np.ndarray, np.ndarray]] = []  # (keys (F,), features (F, D)) per refit
    real = head_refit.pooled_features

    def spy(backbone, frames, *args, **kwargs):  # noqa: ANN001, ANN202
        features = real(backbone, frames, *args, **kwargs)
        featurised.append((np.asarray(frames.keys).copy(), features))
        return features

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(head_refit, "pooled_features", spy)
        run_stage(cfg)
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    return cfg, root, metrics, featurised


def _restricted(cfg):
    from r2m_lab.stages.families import restrict_benchmark

    return restrict_benchmark(cfg, FAMILIES)


def test_rows_row_order_theta0_and_table(heads_run):
    cfg, root, metrics, _ = heads_run
    specialists = [f"specialist:{f}" for f in FAMILIES]
    expected = [*specialists, *[f"{m}/head={h}" for m in MERGERS for h in HEADS]]
    assert metrics["row_order"] == expected and sorted(metrics["models"]) == sorted(expected)
    assert metrics["stage"] == "heads" and metrics["benchmark"] == "synthetic" and metrics["seed"] == 0
    assert metrics["heads"] == HEADS and metrics["families"] == FAMILIES
    theta0 = metrics["theta0"]
    assert theta0["hash"] and Path(theta0["path"]).is_file()
    for label in specialists:
        assert metrics["rows"][label]["kind"] == "specialist"
    for merger in MERGERS:
        for head in HEADS:
            row = metrics["rows"][f"{merger}/head={head}"]
            assert (row["kind"], row["merger"], row["head"], row["base_row"]) == ("merger", merger, head, merger)
            assert row["families"] == FAMILIES
    assert metrics["rows"]["task_arithmetic/head=refit"]["selection"]["chosen"]["lam"] in (0.3, 0.6)
    # the refit facts, per refit row
    assert sorted(metrics["refits"]) == [f"{m}/head=refit" for m in sorted(MERGERS)]
    n_val = len(validation_frames(_restricted(cfg)))
    for facts in metrics["refits"].values():
        assert facts["C"] in CS and [p["C"] for p in facts["cv_curve"]] == CS
        assert facts["frames"] == n_val and facts["split"] == "val" and facts["standardized"] is True
        assert 2 <= facts["folds"] <= 5 and 0.0 <= facts["cv_auc"] <= 1.0
    # the ablation table: one line per row in the summary
    lines = (root / "run" / "results.md").read_text().splitlines()
    for label in expected:
        assert any(line.startswith(f"| {label} |") for line in lines), label


def test_head_variants_are_what_they_claim(heads_run):
    cfg, _, metrics, _ = heads_run
    merged = {m: Path(metrics["merges"][m]["checkpoint_path"]) for m in MERGERS}
    for merger, path in merged.items():
        assert metrics["models"][f"{merger}/head=average"]["checkpoint"] == str(path)  # the merge as it is
        reference = Checkpoint(path)
        for head in HEADS[1:]:
            variant = Checkpoint(metrics["models"][f"{merger}/head={head}"]["checkpoint"])
            assert variant.path == variant_path(path, head) and variant.path.parent == path.parent
            assert variant.base_hash == reference.base_hash != ""
            assert sorted(variant.backbone) == sorted(reference.backbone)
            for key in reference.backbone:  # the merged backbone, bit for bit
                assert torch.equal(variant.backbone[key], reference.backbone[key]), key
            card = variant.card()
            assert card["head"] == head and card["merged_checkpoint"] == str(path)
            if head.startswith("specialist:"):
                name = cfg.benchmark.specialists[head.split(":", 1)[1]].name
                own = Checkpoint(specialist_path(cfg, name)).head
                assert all(torch.equal(variant.head[k], own[k]) for k in ("weight", "bias")), head
            else:
                assert not torch.equal(variant.head["weight"], reference.head["weight"])


def test_refit_sees_validation_only_and_reproduces_sklearn(heads_run):
    cfg, _, metrics, featurised = heads_run
    restricted = _restricted(cfg)
    val = validation_frames(restricted)
    tests = set()
    for sets in restricted.benchmark.protocols.values():
        for data_cfg in sets.values():
            tests.update(instantiate(data_cfg).frames("test").keys.tolist())
    assert len(featurised) == len(MERGERS)  # one featurisation per merged backbone, nothing else
    for (keys, features), merger in zip(featurised, MERGERS, strict=True):
        assert keys.tolist() == val.keys.tolist()  # exactly the pooled validation frames, in order
        assert not set(keys.tolist()) & tests
        facts = metrics["refits"][f"{merger}/head=refit"]
        estimator = head_refit.make_estimator(facts["C"]).fit(features.astype(np.float64), val.labels)
        head = Checkpoint(metrics["models"][f"{merger}/head=refit"]["checkpoint"]).head
        linear = torch.nn.Linear(features.shape[1], 2)
        linear.load_state_dict(head)
        ours = linear(torch.from_numpy(features)).softmax(1)[:, 1].double().detach().numpy()
        np.testing.assert_allclose(ours, estimator.predict_proba(features.astype(np.float64))[:, 1], atol=1e-6)


def test_head_checkpoints_are_reused_only_while_their_sources_are_unchanged(heads_run):
    cfg, _, metrics, _ = heads_run
    cfg = _restricted(cfg)
    card = Checkpoint(metrics["merges"]["average"]["checkpoint_path"]).card()
    by_family = {f: Checkpoint(specialist_path(cfg, cfg.benchmark.specialists[f].name)) for f in FAMILIES}
    refit = {"Cs": CS, "folds": 5}
    for head in HEADS[1:]:
        path = Path(metrics["models"][f"average/head={head}"]["checkpoint"])
        stamp = path.stat().st_mtime_ns
        again, facts = head_checkpoint(cfg, card, head, by_family, refit, reuse=True)
        assert again == path and path.stat().st_mtime_ns == stamp, head
        assert facts == (metrics["refits"]["average/head=refit"] if head == "refit" else None)
    # other refit knobs: refit again, not reused
    path = variant_path(Path(card["checkpoint_path"]), "refit")
    stamp = path.stat().st_mtime_ns
    _, facts = head_checkpoint(cfg, card, "refit", by_family, {"Cs": [1.0], "folds": 5}, reuse=True)
    assert path.stat().st_mtime_ns != stamp and facts["C"] == 1.0


def test_fit_logistic_head_folds_the_scaler_exactly():
    rng = np.random.default_rng(0)
    videos = np.repeat(np.arange(20), 3)  # 20 videos of 3 frames
    labels = (videos % 2).astype(np.int64)
    scales = np.array([1e-2, 1.0, 1e2, 5.0])  # features of very different scales: the scaler must be folded in
    features = (rng.normal(size=(60, 4)) + labels[:, None] * 0.8 + 0.5) * scales
    head, estimator, facts = head_refit.fit_logistic_head(features.astype(np.float32), labels, videos, cs=[0.1, 10])
    assert head["weight"].shape == (2, 4) and head["bias"].shape == (2,) and head["weight"].dtype == torch.float32
    logits = torch.from_numpy(features.astype(np.float32)) @ head["weight"].T + head["bias"]
    ours = logits.softmax(1)[:, 1].double().numpy()
    theirs = estimator.predict_proba(features.astype(np.float32).astype(np.float64))[:, 1]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert facts["folds"] == 5 and facts["videos"] == 20 and facts["C"] in (0.1, 10.0)
    # the folds never split a video
    for train, held in head_refit.cv_splits(labels, videos, 5, seed=0):
        assert not set(videos[train]) & set(videos[held])


def test_fit_refuses_too_few_videos_of_a_class():
    labels = np.array([0, 0, 1, 1, 1, 1])
    videos = np.array(["r", "r", "a", "a", "b", "b"])  # one real video
    with pytest.raises(ValueError, match="two videos of each class"):
        head_refit.fit_logistic_head(np.zeros((6, 2), np.float32), labels, videos, cs=[1.0])


def test_validation_split_with_one_class_is_refused_by_name(tmp_path):
    target = f"{FakeOnlySource.__module__}.{FakeOnlySource.__qualname__}"
    cfg = compose_config(
        tmp_path, [*OVERRIDES, *(f"benchmark.protocols.in_distribution.{f}._target_={target}" for f in FAMILIES)]
    )
    with pytest.raises(ValueError, match="one class only") as err:
        run_stage(cfg)
    assert "synthetic_swap" in str(err.value) and "'real': 0" in str(err.value)
    assert not (tmp_path / "artifacts").exists(), "refused before θ₀ or any specialist"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage.heads=[average,mean]"], "'mean', which is not a head"),
        (["stage.heads=[specialist:edit]"], "'specialist:edit', which is not a head"),
        (["stage.heads=[specialists,specialist:swap]"], "twice"),
        (["stage.heads=[]"], "non-empty list"),
        (["stage.refit.Cs=[0.0,1.0]"], "positive"),
        (["stage.refit.folds=1"], "folds must be an integer >= 2"),
        (["stage.heads=[average]", "stage.refit.folds=1"], "folds must be an integer >= 2"),  # checked even unused
        (["+stage.refit.penalty=l1"], "unknown knobs \\['penalty'\\]"),
        (["+stage.reference_rows=[joint]"], "drop stage.reference_rows"),
    ],
)
def test_bad_knobs_are_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_stage(compose_config(tmp_path, [*OVERRIDES, *overrides]))
    assert not (tmp_path / "artifacts").exists()
