"""The run report: unique-frame scoring, the output ensemble, the typed report, its writers, and metrics.json of a
smoke run pinned key by key and checked value by value against the score CSVs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from r2m_lab.data.sources import FrameSet
from r2m_lab.detector import score_frames
from r2m_lab.evaluation import writers
from r2m_lab.evaluation.ensemble import REDUCTIONS, check_reduction, combine
from r2m_lab.evaluation.report import ModelResult, RunReport, ScoredSet, TaskVectorCosines
from r2m_lab.evaluation.scoring import UniqueFrameScorer
from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import specialist_path
from tests.conftest import compose_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FRAME_KEYS = {"auc", "ap", "eer", "acc", "balanced_acc", "tpr_at_fpr_1", "tpr_at_fpr_5", "n", "n_fake", "n_real"}
INPUT = {"input_size": 4, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC written out: the share of (fake, real) pairs ranked correctly, ties counting half."""
    fake, real = scores[labels == 1], scores[labels == 0]
    diff = fake[:, None] - real[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


# ------------------------------------------------------------------------------------------ unique-frame scoring
class MeanPixel(nn.Module):
    """logits (B, 2) = (0, mean pixel of the frame): P(fake) = sigmoid(mean); counts the frames it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.sizes: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, S, S)
        self.seen += len(x)
        self.sizes.add(x.shape[-1])
        mean = x.flatten(1).mean(1)
        return torch.stack([torch.zeros_like(mean), mean], dim=1)


def frames(name: str, keys: list[str], labels: list[int]) -> FrameSet:
    """Frames whose pixels are a function of their key, so a shared key is the same image in every set."""
    images = np.stack([np.full((4, 4, 3), 10 * int(k.split("_")[1]), dtype=np.uint8) for k in keys])
    return FrameSet(name, np.array(labels), np.array([f"v_{k}" for k in keys]), images=images, keys=np.array(keys))


def test_unique_frame_scorer_scores_each_shared_frame_once_and_maps_back():
    sets = {
        "validation": frames("val", ["f_1", "f_2", "f_3"], [0, 1, 1]),
        "a": frames("a", ["f_2", "f_4", "f_1"], [1, 0, 0]),
        "b": frames("b", ["f_4", "f_4", "f_5"], [0, 0, 1]),
    }
    scorer = UniqueFrameScorer(sets, batch_size=2)
    assert len(scorer) == 5  # f_1 … f_5
    model = MeanPixel()
    scores = scorer(model, INPUT)
    assert model.seen == 5, "each distinct frame goes through the model once"
    assert list(scores) == ["validation", "a", "b"]
    for name, frame_set in sets.items():
        alone = score_frames(MeanPixel(), torch.utils.data.DataLoader(_dataset(frame_set), batch_size=8))
        np.testing.assert_array_equal(scores[name], alone)
    assert scores["a"][0] == scores["validation"][1] and scores["b"][0] == scores["b"][1] == scores["a"][1]
    # the next model reuses the loader; another input size builds a new one rather than resizing silently
    scorer(model, INPUT)
    assert model.sizes == {4}
    scorer(model, {**INPUT, "input_size": 8})
    assert model.sizes == {4, 8} and model.seen == 15


def _dataset(frame_set: FrameSet):  # noqa: ANN202 — the loaders' dataset on the same transform
    from r2m_lab.data.loaders import FrameDataset, build_transform

    return FrameDataset(frame_set, build_transform(INPUT))


class TinyNet(nn.Module):
    """A real little network (conv → pool → linear): its float sums are what batching could change."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) → (B, 2)
        return self.fc(self.conv(x).relu().mean((2, 3)))


def _noise_frames(n: int, seed: int = 0) -> FrameSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
    keys = np.array([f"f_{i}" for i in range(n)])
    return FrameSet("noise", rng.integers(0, 2, n), np.array([f"v_{i}" for i in range(n)]), images=images, keys=keys)


@pytest.mark.parametrize("cache_bytes", [1 << 30, 3 * 4 * 4 * 4 * 2 * 3], ids=["cached", "chunks-of-3-batches"])
def test_score_models_decodes_once_and_matches_one_loader_per_model(cache_bytes):
    """Several models on one decode give the very numbers of one plain loader pass per model, cached or chunked."""
    sets = {"validation": _noise_frames(10, 1), "test": _noise_frames(23, 2)}  # keys f_0 … f_22: 23 distinct frames
    scorer = UniqueFrameScorer(sets, batch_size=2, cache_bytes=cache_bytes)
    nets = {f"m{i}": TinyNet(i) for i in range(3)}
    got = dict(scorer.score_models({label: (lambda net=net: (net, INPUT)) for label, net in nets.items()}))
    assert list(got) == list(nets) and scorer.decoded == len(scorer) == 23, "every frame decoded once for 3 models"
    for label, net in nets.items():
        # the reference: the former scorer, one plain loader over the distinct frames per model
        alone = score_frames(net, torch.utils.data.DataLoader(_dataset(scorer.unique), batch_size=2))
        by_key = dict(zip(scorer.unique.keys.tolist(), alone, strict=True))
        for name, frame_set in sets.items():
            expected = np.array([by_key[k] for k in frame_set.keys.tolist()])
            np.testing.assert_array_equal(got[label][name], expected)  # bit for bit: same batches, same arithmetic
    np.testing.assert_array_equal(scorer.keys_of("test"), sets["test"].keys)


def test_scorer_keeps_batches_across_calls_and_rebuilds_for_another_input():
    scorer = UniqueFrameScorer({"validation": _noise_frames(7)}, batch_size=3)
    net = TinyNet(0)
    first = scorer(net, INPUT)["validation"]
    np.testing.assert_array_equal(scorer(TinyNet(0), INPUT)["validation"], first)
    assert scorer.decoded == 7, "a second model (a grid point) reuses the decoded batches"
    scorer(net, {**INPUT, "input_size": 5})
    assert scorer.decoded == 14, "another input size decodes again rather than resizing silently"


def test_scorer_streams_a_single_model_over_budget_and_chunks_mixed_inputs():
    """Over budget: one model streams (nothing kept); models of two input sizes in chunks each get their own size."""
    frames_ = _noise_frames(9)
    scorer = UniqueFrameScorer({"validation": frames_}, batch_size=2, cache_bytes=0)
    net = MeanPixel()
    scorer(net, INPUT)
    assert scorer.decoded == 9 and scorer._cached is None
    other = MeanPixel()
    dict(scorer.score_models({"a": lambda: (net, INPUT), "b": lambda: (other, {**INPUT, "input_size": 5})}))
    assert net.sizes == {4} and other.sizes == {5} and net.seen == other.seen + 9 == 18


def test_unique_frame_scorer_refuses_no_sets():
    with pytest.raises(ValueError, match="at least one frame set"):
        UniqueFrameScorer({}, batch_size=2)


# ------------------------------------------------------------------------------------------ output ensemble
def test_ensemble_reductions_by_hand():
    p = [np.array([0.1, 0.9, 0.5]), np.array([0.3, 0.2, 0.5]), np.array([0.8, 0.4, 0.2])]
    np.testing.assert_allclose(combine(p), [0.4, 0.5, 0.4])
    np.testing.assert_allclose(combine(p, "median"), [0.3, 0.4, 0.5])
    np.testing.assert_allclose(combine(p, "max"), [0.8, 0.9, 0.5])
    assert combine(p).dtype == np.float64 and REDUCTIONS == ("mean", "median", "max")


def test_ensemble_refuses_bad_input():
    with pytest.raises(ValueError, match="mean, median, max; got 'mode'"):
        check_reduction("mode")
    with pytest.raises(ValueError, match="at least one"):
        combine([])
    with pytest.raises(ValueError, match=r"same frames.*\(2,\), \(3,\)"):
        combine([np.zeros(3), np.zeros(2)])


# ------------------------------------------------------------------------------------------ the typed report
def scored(name: str, labels: list[int], videos: list[str]) -> ScoredSet:
    return ScoredSet(name, np.array([f"{name}/{i}" for i in range(len(labels))]), np.array(videos), np.array(labels))


SETS = {
    "validation": scored("validation", [0, 0, 1, 1], ["v0", "v1", "v2", "v3"]),
    "p/x": scored("p/x", [0, 0, 1, 1, 1, 0], ["a", "a", "b", "b", "c", "d"]),
    "q/y": scored("q/y", [0, 1, 0, 1], ["e", "f", "g", "h"]),
}
PROTOCOLS = {"p": ["p/x"], "q": ["q/y"]}
SCORES = {
    "good": {
        "validation": np.array([0.1, 0.3, 0.6, 0.9]),
        "p/x": np.array([0.1, 0.2, 0.7, 0.8, 0.9, 0.3]),
        "q/y": np.array([0.2, 0.9, 0.3, 0.6]),
    },
    "poor": {
        "validation": np.array([0.5, 0.7, 0.6, 0.4]),
        "p/x": np.array([0.9, 0.2, 0.1, 0.8, 0.3, 0.4]),
        "q/y": np.array([0.6, 0.2, 0.3, 0.4]),
    },
}


def make_report(**kwargs) -> RunReport:  # noqa: ANN003 — RunReport fields
    models = {m: ModelResult.from_scores(f"/ckpt/{m}", s, SETS, ["p/x", "q/y"]) for m, s in SCORES.items()}
    return RunReport(benchmark="toy", protocols=PROTOCOLS, sets=SETS, models=models, **kwargs)


def test_model_result_fits_the_threshold_on_validation_and_measures_every_test_set():
    result = make_report().models["good"]
    # validation reals 0.1, 0.3, fakes 0.6, 0.9: the EER point sits between 0.3 and 0.6, where FPR = FNR = 0
    assert 0.3 < result.threshold <= 0.6
    assert list(result.test) == ["p/x", "q/y"]
    assert result.test["p/x"]["frame"]["auc"] == pytest.approx(rank_auc(SCORES["good"]["p/x"], SETS["p/x"].labels))
    assert result.test["p/x"]["video"]["n"] == 4 and result.test["p/x"]["frame"]["n"] == 6
    assert result.test["q/y"]["frame"]["acc"] == pytest.approx(1.0)  # 0.2, 0.3 real; 0.9, 0.6 fake at that threshold
    assert set(result.to_json()) == {"checkpoint", "threshold", "threshold_fitted_on", "validation", "test"}
    assert result.to_json()["checkpoint"] == "/ckpt/good"


def test_model_result_refuses_scores_that_do_not_fit_the_sets():
    with pytest.raises(ValueError, match="3 scores for the 4 frames of validation"):
        ModelResult.from_scores("m", {**SCORES["good"], "validation": np.zeros(3)}, SETS, ["p/x"])
    with pytest.raises(ValueError, match=r"set\(s\) \['r/z'\]"):
        ModelResult.from_scores("m", SCORES["good"], SETS, ["p/x", "r/z"])


def test_report_rows_context_and_json():
    report = make_report()
    assert report.test_sets == ["p/x", "q/y"]
    auc = report.auc_matrix("frame")
    assert auc.shape == (2, 2) and auc[0, 0] > auc[1, 0]  # the good model ranks p/x better than the poor one
    assert list(report.reordered(["poor", "joint", "good"]).models) == ["poor", "good"]  # absent names skipped
    with pytest.raises(ValueError, match=r"drop the row\(s\) \['good'\]"):
        report.reordered(["poor"])
    with pytest.raises(ValueError, match="overwrite"):
        report.with_context(extra={"models": {}})
    full = report.with_context("toy run", {"seed": 3, "timings_seconds": {"evaluate": 2.4}})
    assert full.title == "toy run" and full.timings_seconds == {"evaluate": 2.4} and full.task_vector_cosines is None
    payload = full.to_json()
    assert list(payload) == [
        "benchmark",
        "protocols",
        "models",
        "row_order",
        "protocol_order",
        "seed",
        "timings_seconds",
    ]
    assert payload["row_order"] == ["good", "poor"] and payload["protocol_order"] == ["p", "q"]
    assert payload["models"]["good"] == report.models["good"].to_json()
    assert "scores" not in json.dumps(payload)
    with pytest.raises(ValueError, match=r"2 names"):
        TaskVectorCosines(["a", "b"], [[1.0]])


# ------------------------------------------------------------------------------------------ writers
def test_writers_render_the_report(tmp_path):
    cosines = {"names": ["a", "b"], "matrix": [[1.0, 0.25], [0.25, 1.0]]}
    report = make_report().with_context("toy run", {"task_vector_cosines": cosines, "timings_seconds": {"x": 1.0}})
    assert json.loads(writers.write_metrics_json(report, tmp_path).read_text()) == report.to_json()

    frame_csv, video_csv = writers.write_table_csv(report, tmp_path)
    with frame_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == ["good", "poor"]
    assert list(rows[0]) == ["model", "p/x", "p mean", "q/y", "q mean"]
    assert float(rows[1]["q/y"]) == pytest.approx(report.models["poor"].test["q/y"]["frame"]["auc"])
    assert video_csv.name == "table_auc_video.csv"
    tex = [p.read_text() for p in writers.write_table_latex(report, tmp_path)]
    assert all(t.startswith(r"\begin{tabular}{lrrrr}") for t in tex)

    text = writers.render_markdown(report)
    lines = text.splitlines()
    assert lines[0] == "# toy run"
    headings = [line for line in lines if line.startswith("## ")]
    assert headings == [
        "## Mean AUC per protocol",
        "## p: frame-level AUC per test set",
        "## q: frame-level AUC per test set",
        "## Task-vector cosines",
        "## Time",
    ]
    assert "| model | p (frame) | p (video) | q (frame) | q (video) |" in lines
    assert "| model | x | mean |" in lines and "| model | y | mean |" in lines
    assert sum(line.startswith("| good |") for line in lines) == 3  # summary + one table per protocol
    assert lines[-1] == "x 1 s"
    assert writers.write_markdown(report, tmp_path).read_text() == text

    pngs = writers.write_heatmaps(report, tmp_path) + writers.write_roc_curves(report, tmp_path)
    assert sorted(p.name for p in pngs) == [
        "auc_frame.png",
        "auc_video.png",
        "roc_p__x.png",
        "roc_q__y.png",
        "task_vector_cosines.png",
    ]
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in pngs)


def test_score_csvs_hold_every_frame_and_the_video_means(tmp_path):
    report = make_report()
    paths = writers.write_scores(tmp_path, "merged:r2m", report.models["good"], report.sets)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "scores/merged-r2m/p__x.csv",
        "scores/merged-r2m/p__x.videos.csv",
        "scores/merged-r2m/q__y.csv",
        "scores/merged-r2m/q__y.videos.csv",
    ]
    with paths[0].open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["frame"] for r in rows] == SETS["p/x"].keys.tolist()
    np.testing.assert_array_equal([float(r["score"]) for r in rows], SCORES["good"]["p/x"])
    with paths[1].open(newline="") as fh:
        videos = {r["video_id"]: (int(r["label"]), float(r["score"])) for r in csv.DictReader(fh)}
    assert videos == {"a": (0, pytest.approx(0.15)), "b": (1, pytest.approx(0.75)), "c": (1, 0.9), "d": (0, 0.3)}


class WandbLogger:
    """Records what the writer sends; named like Lightning's so the table and images are sent too."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.tables: list[tuple[str, list[str], list[list]]] = []
        self.images: list[str] = []

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)

    def log_table(self, key: str, columns: list[str], data: list[list]) -> None:
        self.tables.append((key, columns, data))

    def log_image(self, key: str, images: list[str], caption: list[str]) -> None:
        self.images += caption


def test_logger_gets_the_frame_aucs_the_table_and_the_plots(tmp_path):
    report = make_report()
    writers.write_heatmaps(report, tmp_path)
    logger = WandbLogger()
    writers.log_to_logger(report, logger, tmp_path)
    assert logger.metrics == {
        f"{m}/{n}/auc": report.models[m].test[n]["frame"]["auc"] for m in ("good", "poor") for n in ("p/x", "q/y")
    }
    ((key, columns, data),) = logger.tables
    assert key == "auc_frame" and columns[0] == "model" and [row[0] for row in data] == ["good", "poor"]
    assert logger.images == ["auc_frame", "auc_video"]


# ------------------------------------------------------------------------------------------ a smoke run, end to end
def read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return np.array([float(r["score"]) for r in rows]), np.array([int(r["label"]) for r in rows])


def test_smoke_ensemble_run_pins_metrics_json(trained_root, tmp_path):
    """stage=evaluate stage.model=ensemble: metrics.json keeps its keys, and its numbers follow from the CSVs."""
    cfg = compose_config(
        trained_root,
        ["stage=evaluate", "stage.model=ensemble", "stage.ensemble_reduction=max", f"paths.output_dir={tmp_path}"],
    )
    returned = run_stage(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    members = [f"specialist:{d.name}" for d in cfg.benchmark.specialists.values()]
    protocols = {p: [f"{p}/{k}" for k in sets] for p, sets in cfg.benchmark.protocols.items()}
    assert set(metrics) == {"benchmark", "protocols", "models", "row_order", "protocol_order"}
    assert metrics["benchmark"] == "synthetic" and metrics["row_order"] == list(returned["models"])
    assert metrics["protocol_order"] == list(cfg.benchmark.protocols)
    assert metrics["protocols"] == protocols and list(returned["models"]) == [*members, "ensemble"]
    assert set(metrics["models"]) == {*members, "ensemble"}
    for model, result in metrics["models"].items():
        assert set(result) == {"checkpoint", "threshold", "threshold_fitted_on", "validation", "test"}, model
        assert result["threshold_fitted_on"] == "validation (EER point)"
        assert set(result["validation"]) == {"frame", "video"}
        assert set(result["test"]) == {n for names in protocols.values() for n in names}
        for name, entry in result["test"].items():
            assert set(entry) == {"frame", "video"} and set(entry["frame"]) == set(entry["video"]) == FRAME_KEYS
            scores, labels = read_scores(
                tmp_path / "scores" / writers.safe_name(model) / f"{writers.safe_name(name)}.csv"
            )
            assert entry["frame"]["n"] == len(scores) and entry["frame"]["n_fake"] == int(labels.sum())
            assert entry["frame"]["auc"] == pytest.approx(rank_auc(scores, labels), abs=1e-6), (model, name)
            fake = scores >= result["threshold"]
            assert entry["frame"]["acc"] == pytest.approx(float(np.mean(fake == labels.astype(bool)))), (model, name)
    for member in members:
        path = specialist_path(cfg, member.split(":", 1)[1])
        assert metrics["models"][member]["checkpoint"] == str(path)
    assert metrics["models"]["ensemble"]["checkpoint"] == "max of " + ", ".join(members)
    name = writers.safe_name("unseen/grid")
    stacked = np.stack([read_scores(tmp_path / "scores" / writers.safe_name(m) / f"{name}.csv")[0] for m in members])
    np.testing.assert_array_equal(read_scores(tmp_path / "scores" / "ensemble" / f"{name}.csv")[0], stacked.max(0))
    assert (tmp_path / "results.md").read_text().splitlines()[0] == "# ensemble of 4 specialists on synthetic"


def test_ensemble_reduction_is_checked_before_any_scoring(tmp_path):
    cfg = compose_config(tmp_path, ["stage=evaluate", "stage.ensemble_reduction=mode"])
    with pytest.raises(ValueError, match="mean, median, max; got 'mode'"):
        run_stage(cfg)
    assert not (tmp_path / "run" / "scores").exists()
