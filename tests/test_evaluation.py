"""Evaluation: metrics against hand-computed values, thresholds, video aggregation, tables and plots."""

from __future__ import annotations

import csv
import logging
import math

import numpy as np
import pytest
import torch

from r2m_lab.evaluation.metrics import (
    evaluate_scores,
    fit_threshold,
    frame_metrics,
    roc_curve,
    video_metrics,
    video_scores,
)
from r2m_lab.evaluation.plots import plot_heatmap, plot_roc
from r2m_lab.evaluation.tables import cosine_table, results_table, to_latex, to_markdown, write_csv

torch.set_num_threads(1)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FRAME_KEYS = ("auc", "ap", "eer", "acc", "balanced_acc", "tpr_at_fpr_1", "tpr_at_fpr_5", "n", "n_fake", "n_real")

# Reals score 0.1 and 0.4, fakes 0.35 and 0.8. Ordered pairs (fake, real) ranked correctly: 3 of 4 -> AUC 0.75.
# Descending: 0.8 F (P=1, R=1/2), 0.4 R, 0.35 F (P=2/3, R=1) -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
HAND4_SCORES = [0.1, 0.4, 0.35, 0.8]
HAND4_LABELS = [0, 0, 1, 1]

# Reals 0.2, 0.3, 0.9; fake 0.6. ROC points: (0,0)@1, (1/3,0)@.9, (1/3,1)@.6, (2/3,1)@.3, (1,1)@.2.
# FNR - FPR: 1, 2/3, -1/3, ... -> crossing 2/3 of the way along the vertical segment (1/3,0)->(1/3,1):
# EER = 1/3 (FNR there is 1 - 2/3 = 1/3), threshold = .9 + 2/3 * (.6 - .9) = 0.7.
# (torchmetrics' nearest-point binary_eer would say (1/3 + 0) / 2 = 1/6.)
EER_SCORES = [0.2, 0.3, 0.9, 0.6]
EER_LABELS = [0, 0, 0, 1]


# ---------------------------------------------------------------- ranking metrics


@pytest.mark.parametrize("kind", ["list", "numpy", "torch"])
def test_perfect_and_reversed_separation(kind: str) -> None:
    convert = {"list": list, "numpy": np.asarray, "torch": torch.tensor}[kind]
    scores, labels = [0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]
    perfect = frame_metrics(convert(scores), convert(labels))
    assert perfect["auc"] == pytest.approx(1.0)
    assert perfect["ap"] == pytest.approx(1.0)
    assert perfect["eer"] == pytest.approx(0.0)
    assert perfect["tpr_at_fpr_1"] == pytest.approx(1.0)

    reversed_ = frame_metrics(convert(scores), convert([1, 1, 0, 0]))
    assert reversed_["auc"] == pytest.approx(0.0)
    assert reversed_["eer"] == pytest.approx(1.0)
    assert reversed_["tpr_at_fpr_5"] == pytest.approx(0.0)


def test_hand_computed_auc_ap_and_counts() -> None:
    m = frame_metrics(HAND4_SCORES, HAND4_LABELS)
    assert m["auc"] == pytest.approx(0.75)
    assert m["ap"] == pytest.approx(5 / 6)
    # ROC: (0,0) (0,1/2) (1/2,1/2) (1/2,1) (1,1): no FPR between 0 and 1/2, so TPR@1% = TPR@5% = 1/2; EER at (1/2,1/2).
    assert m["tpr_at_fpr_1"] == pytest.approx(0.5)
    assert m["tpr_at_fpr_5"] == pytest.approx(0.5)
    assert m["eer"] == pytest.approx(0.5)
    assert (m["n"], m["n_fake"], m["n_real"]) == (4, 2, 2)
    assert set(m) == set(FRAME_KEYS)


def test_ties_count_half() -> None:
    assert frame_metrics([0.5, 0.5], [0, 1])["auc"] == pytest.approx(0.5)


def test_eer_is_interpolated_on_the_roc() -> None:
    m = frame_metrics(EER_SCORES, EER_LABELS)
    assert m["eer"] == pytest.approx(1 / 3, abs=1e-9)
    # Horizontal crossing: real 0.6, fakes 0.2, 0.3, 0.9 -> segment (0,1/3)->(1,1/3), EER where FPR = 2/3.
    assert frame_metrics([0.6, 0.2, 0.3, 0.9], [0, 1, 1, 1])["eer"] == pytest.approx(2 / 3, abs=1e-9)


def test_roc_curve_starts_at_origin_even_with_a_score_of_one() -> None:
    fpr, tpr, thr = roc_curve([1.0, 0.5, 1.0], [0, 1, 1])
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert thr[0] > 1.0  # threshold 1.0 would already call the two 1.0 scores fake
    assert np.all(np.diff(thr) < 0)


# ---------------------------------------------------------------- thresholds and accuracy


def test_threshold_modes() -> None:
    assert fit_threshold(EER_SCORES, EER_LABELS, mode="fixed") == 0.5
    assert fit_threshold(EER_SCORES, EER_LABELS, mode="eer") == pytest.approx(0.7)
    # 10 reals at 0.00..0.09 plus one at 0.95, 10 fakes at 0.50..0.59. FPR <= 1/11 allows the 0.95 real only:
    # the lowest threshold keeping FPR <= 10 % is the lowest fake, 0.50 (TPR 1). FPR <= 5 % allows no real at all,
    # so the threshold sits just above 0.95.
    reals = [i / 100 for i in range(10)] + [0.95]
    fakes = [0.5 + i / 100 for i in range(10)]
    scores, labels = reals + fakes, [0] * 11 + [1] * 10
    assert fit_threshold(scores, labels, mode="fpr", target_fpr=0.10) == pytest.approx(0.50)
    t5 = fit_threshold(scores, labels, mode="fpr", target_fpr=0.05)
    assert 0.95 < t5 <= 1.0
    assert frame_metrics(scores, labels, threshold=t5)["acc"] == pytest.approx(11 / 21)  # nothing called fake


def test_threshold_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        fit_threshold(EER_SCORES, EER_LABELS, mode="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="both classes"):
        fit_threshold([0.1, 0.2], [0, 0], mode="eer")


def test_acc_and_balanced_acc_at_threshold() -> None:
    # 3 reals (0.1, 0.2, 0.6), 1 fake (0.7). At 0.5: TN 2, FP 1, TP 1 -> acc 3/4, balanced (1 + 2/3) / 2 = 5/6.
    scores, labels = [0.1, 0.2, 0.6, 0.7], [0, 0, 0, 1]
    m = frame_metrics(scores, labels, threshold=0.5)
    assert m["acc"] == pytest.approx(3 / 4)
    assert m["balanced_acc"] == pytest.approx(5 / 6)
    # At 0.65 everything is right; at exactly 0.7 the fake is still fake (score >= threshold).
    assert frame_metrics(scores, labels, threshold=0.65)["acc"] == pytest.approx(1.0)
    assert frame_metrics(scores, labels, threshold=0.7)["balanced_acc"] == pytest.approx(1.0)
    assert frame_metrics(scores, labels, threshold=0.71)["balanced_acc"] == pytest.approx(0.5)


def test_one_class_gives_nan_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="r2m_lab.evaluation.metrics"):
        m = frame_metrics([0.2, 0.7, 0.9], [1, 1, 1])
    for key in ("auc", "ap", "eer", "tpr_at_fpr_1", "tpr_at_fpr_5"):
        assert math.isnan(m[key]), key
    assert m["acc"] == pytest.approx(2 / 3)
    assert m["balanced_acc"] == pytest.approx(2 / 3)
    assert "one class" in caplog.text


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        frame_metrics([], [])
    with pytest.raises(ValueError, match="length"):
        frame_metrics([0.1, 0.2], [0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        frame_metrics([-2.0, 3.0], [0, 1])  # logits, not probabilities
    with pytest.raises(ValueError, match="labels"):
        frame_metrics([0.1, 0.2], [0, 2])


# ---------------------------------------------------------------- video level

# Video "a" (real): 0.1, 0.2, 0.6 -> mean 0.3, median 0.2, max 0.6.
# Video "b" (fake): 0.4, 0.8 -> mean 0.6, median 0.6, max 0.8.
# Video "c" (fake): 0.3 alone.
V_SCORES = [0.1, 0.4, 0.2, 0.8, 0.6, 0.3]
V_LABELS = [0, 1, 0, 1, 0, 1]
V_IDS = ["a", "b", "a", "b", "a", "c"]


@pytest.mark.parametrize(
    ("reduce", "expected"), [("mean", [0.3, 0.6, 0.3]), ("median", [0.2, 0.6, 0.3]), ("max", [0.6, 0.8, 0.3])]
)
def test_video_aggregation(reduce: str, expected: list[float]) -> None:
    scores, labels, ids = video_scores(V_SCORES, V_LABELS, V_IDS, reduce=reduce)  # type: ignore[arg-type]
    assert ids == ["a", "b", "c"]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    assert labels.tolist() == [0, 1, 1]


def test_video_metrics_use_aggregated_scores() -> None:
    # Mean scores: a 0.3 (real), b 0.6 (fake), c 0.3 (fake): one tie between the real and a fake -> AUC 0.75.
    m = video_metrics(V_SCORES, V_LABELS, V_IDS, threshold=0.5)
    assert (m["n"], m["n_fake"], m["n_real"]) == (3, 2, 1)
    assert m["auc"] == pytest.approx(0.75)
    assert m["acc"] == pytest.approx(2 / 3)  # a real (0.3), b fake (0.6), c called real (0.3)


def test_mixed_label_video_raises_with_its_id() -> None:
    with pytest.raises(ValueError, match="'vid_7'"):
        video_scores([0.1, 0.9, 0.5], [0, 1, 0], ["ok", "vid_7", "vid_7"])


def test_evaluate_scores_structure() -> None:
    out = evaluate_scores(np.array(V_SCORES), torch.tensor(V_LABELS), V_IDS, threshold=0.5)
    assert set(out) == {"frame", "video"}
    assert out["frame"]["n"] == 6
    assert out["video"]["n"] == 3


# ---------------------------------------------------------------- tables


def _entry(auc: float) -> dict[str, dict[str, float]]:
    return {"frame": {"auc": auc, "eer": 1 - auc}, "video": {"auc": auc + 0.01, "eer": 0.99 - auc}}


RESULTS = {
    "specialist_FS": {"FS_ff": _entry(0.90), "FR_ff": _entry(0.60), "heygen": _entry(0.55)},
    "r2m": {"FS_ff": _entry(0.85), "FR_ff": _entry(0.80), "heygen": _entry(0.70)},
}
PROTOCOLS = {"in_distribution": ["FS_ff", "FR_ff"], "unseen": ["heygen"]}


def test_results_table_rows_and_means() -> None:
    rows = results_table(RESULTS, PROTOCOLS, metric="auc", level="frame")
    assert [r["model"] for r in rows] == ["specialist_FS", "r2m"]
    assert list(rows[0]) == ["model", "FS_ff", "FR_ff", "in_distribution mean", "heygen", "unseen mean"]
    assert rows[0]["in_distribution mean"] == pytest.approx(0.75)
    assert rows[1]["in_distribution mean"] == pytest.approx(0.825)
    assert rows[1]["unseen mean"] == pytest.approx(0.70)
    video = results_table(RESULTS, PROTOCOLS, metric="auc", level="video")
    assert video[0]["FS_ff"] == pytest.approx(0.91)


def test_results_table_missing_entry_and_unknown_metric() -> None:
    results = {"m": {"FS_ff": _entry(0.9)}}
    row = results_table(results, PROTOCOLS)[0]
    assert math.isnan(row["FR_ff"]) and math.isnan(row["in_distribution mean"])
    with pytest.raises(KeyError, match="acu"):
        results_table(results, PROTOCOLS, metric="acu")


def test_markdown_header_and_bold_best() -> None:
    rows = results_table(RESULTS, PROTOCOLS)
    md = to_markdown(rows)
    lines = md.strip().splitlines()
    assert lines[0] == "| model | FS_ff | FR_ff | in_distribution mean | heygen | unseen mean |"
    assert lines[1].startswith("|:---|---:|")
    assert lines[2] == "| specialist_FS | **0.900** | 0.600 | 0.750 | 0.550 | 0.550 |"
    assert lines[3] == "| r2m | 0.850 | **0.800** | **0.825** | **0.700** | **0.700** |"
    # For EER lower is better.
    eer = to_markdown(results_table(RESULTS, PROTOCOLS, metric="eer"), best="min")
    assert eer.splitlines()[2] == "| specialist_FS | **0.100** | 0.400 | 0.250 | 0.450 | 0.450 |"
    assert eer.splitlines()[3] == "| r2m | 0.150 | **0.200** | **0.175** | **0.300** | **0.300** |"


def test_markdown_nan_and_file(tmp_path) -> None:
    rows = [{"model": "a", "auc": math.nan}, {"model": "b", "auc": 0.5}]
    md = to_markdown(rows, path=tmp_path / "t" / "table.md")
    assert "| a | n/a |" in md
    assert "| b | 0.500 |" in md  # a single finite value is not "best" of anything
    assert (tmp_path / "t" / "table.md").read_text() == md


def test_csv_round_trip(tmp_path) -> None:
    rows = results_table(RESULTS, PROTOCOLS)
    path = write_csv(rows, tmp_path / "out" / "table.csv")
    with path.open(newline="") as fh:
        back = list(csv.DictReader(fh))
    assert [r["model"] for r in back] == ["specialist_FS", "r2m"]
    assert list(back[0]) == list(rows[0])
    for orig, read in zip(rows, back, strict=True):
        for key, value in orig.items():
            assert (read[key] == value) if key == "model" else float(read[key]) == value
    assert [p.name for p in path.parent.iterdir()] == ["table.csv"]  # no temp file left behind


def test_latex_and_cosine_table() -> None:
    tex = to_latex([{"model": "task_arith", "auc": 0.7}, {"model": "r2m", "auc": 0.8}])
    assert tex.startswith(r"\begin{tabular}{lr}")
    assert r"task\_arith & 0.700 \\" in tex
    assert r"r2m & \textbf{0.800} \\" in tex
    md = cosine_table(["FS", "FR"], torch.tensor([[1.0, 0.25], [0.25, 1.0]]))
    assert md.splitlines() == ["| | FS | FR |", "|:---|---:|---:|", "| FS | 1.000 | 0.250 |", "| FR | 0.250 | 1.000 |"]
    with pytest.raises(ValueError, match="shape"):
        cosine_table(["FS"], np.eye(2))


# ---------------------------------------------------------------- plots


def test_plot_roc_writes_png(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    curves = {
        "good": ((labels + 0.8 * torch.rand(200, generator=gen)) / 1.8, labels),
        "random": (torch.rand(200, generator=gen), labels),
        "one_class": (torch.rand(10, generator=gen), torch.ones(10, dtype=torch.int64)),
    }
    path = plot_roc(curves, tmp_path / "plots" / "roc.png", title="ROC test")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["roc.png"]


def test_plot_heatmap_writes_png(tmp_path) -> None:
    values = np.array([[0.9, 0.6, np.nan], [0.85, 0.8, 0.7]])
    path = plot_heatmap(["spec", "r2m"], ["FS", "FR", "heygen"], values, tmp_path / "h.png", "AUC", vmin=0.5, vmax=1)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="shape"):
        plot_heatmap(["a"], ["b"], values, tmp_path / "bad.png", "bad")
    assert not (tmp_path / "bad.png").exists()
