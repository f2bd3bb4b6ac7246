"""Tables from synthetic run folders with known answers: cells, ties, strict wins, pairs, groups, plots, the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from r2m_lab.results.build import build_tables
from r2m_lab.results.stats import plain_auc
from tests.conftest import REPO
from tests.results_fixtures import noisy, set_frames, standard_rows, write_run


def rows_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_identical_models_tie_with_an_interval_of_exactly_zero(tmp_path):
    same = noisy(1.0)
    rows = {
        "average": ({"merger": "average"}, same),
        "r2m": ({"merger": "r2m"}, same),
        "weak": ({"merger": "ties"}, noisy(0.2)),
    }
    for seed in (0, 1):
        write_run(tmp_path / "runs" / f"s{seed}", seed=seed, rows=rows)
    result = build_tables([tmp_path / "runs"], tmp_path / "out", replicates=200)
    (table,) = result.tables
    for level in ("frame", "video"):
        pairs = [p for p in table.pairs[level] if {p["row"], p["reference"]} == {"average", "r2m"}]
        assert pairs and all((p["mean_diff"], p["lo"], p["hi"], p["excludes_zero"]) == (0, 0, 0, False) for p in pairs)
        for column in table.columns:
            assert table.cells[level][("average", column.name)].mark == "tie"
            assert table.cells[level][("r2m", column.name)].mark == "tie"
            assert table.cells[level][("weak", column.name)].mark == ""
    md = (tmp_path / "out" / "tables" / "pipeline.md").read_text()
    assert "≈" in md and "**" not in md and "the best and the runner-up are a tie" in md
    saved = rows_csv(tmp_path / "out" / "tables" / "pairs_frame.csv")
    assert {r["excludes_zero"] for r in saved if {r["row"], r["reference"]} == {"average", "r2m"}} == {"False"}


def test_a_model_better_on_every_video_is_bold_and_its_interval_excludes_zero(tmp_path):
    # "ties" separates every fake from every real video (scores 0.9 vs 0.1), the others are near chance (a seed on
    # which the runner-up happened to be perfect too, drawn three times, would rightly make the interval touch 0)
    def perfect(labels, video, test_set, seed):
        return np.where(labels == 1, 0.9, 0.1)

    rows = {**standard_rows(r2m=0.2, average=0.1), "ties": ({"merger": "ties"}, perfect)}
    rows["specialist:swap"] = (rows["specialist:swap"][0], noisy(0.15))
    for seed in (0, 1, 2):
        write_run(tmp_path / "runs" / f"s{seed}", seed=seed, rows=rows)
    result = build_tables([tmp_path / "runs"], tmp_path / "out", replicates=300, seed=4)
    (table,) = result.tables
    for level in ("frame", "video"):
        for column in table.columns:
            assert table.cells[level][("ties", column.name)].mark == "best"
            assert table.cells[level][("ties", column.name)].text() == "1.000 ± 0.000"
        against = [p for p in table.pairs[level] if p["row"] == "ties"]
        assert {p["reference"] for p in against} == {"r2m", "average"}
        assert all(p["excludes_zero"] and p["lo"] > 0 for p in against)
    md = result.markdown
    assert "**1.000 ± 0.000**" in md and "3 seeds (0, 1, 2)" in md
    assert r"\textbf{1.000 $\pm$ 0.000}" in (tmp_path / "out" / "tables" / "pipeline.tex").read_text()
    saved = json.loads((tmp_path / "out" / "tables.json").read_text())
    assert saved["bootstrap"]["replicates"] == 300 and saved["bootstrap"]["seed"] == 4
    assert len(saved["runs"]) == 3 and saved["tables"][0]["seeds"] == [0, 1, 2]


def test_cells_are_mean_and_sample_std_over_seeds_and_the_csv_carries_the_other_metrics(tmp_path):
    for seed in (0, 1, 2):
        write_run(tmp_path / "runs" / f"s{seed}", seed=seed, rows=standard_rows())
    build_tables([tmp_path / "runs"], tmp_path / "out", replicates=20)
    aucs = []
    for seed in (0, 1, 2):
        metrics = json.loads((tmp_path / "runs" / f"s{seed}" / "metrics.json").read_text())
        aucs.append(metrics["models"]["r2m"]["test"]["unseen/grid"]["frame"]["auc"])
    saved = rows_csv(tmp_path / "out" / "tables" / "pipeline.csv")
    (cell,) = [r for r in saved if (r["level"], r["row"], r["column"]) == ("frame", "r2m", "unseen/grid")]
    assert float(cell["auc_mean"]) == pytest.approx(np.mean(aucs))
    assert float(cell["auc_std"]) == pytest.approx(np.std(aucs, ddof=1))
    assert cell["text"] == f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}"
    assert {"ap_mean", "eer_mean", "tpr_at_fpr_1_mean", "tpr_at_fpr_5_mean"} <= set(cell) and cell["eer_mean"]
    (mean,) = [r for r in saved if (r["level"], r["row"], r["column"]) == ("video", "r2m", "in_distribution mean")]
    assert mean["n_seeds"] == "3"


def test_one_seed_has_no_std_and_says_one_seed(tmp_path):
    write_run(tmp_path / "run", seed=0, rows=standard_rows())
    result = build_tables([tmp_path / "run"], tmp_path / "out", replicates=20)
    assert "1 seed (0)" in result.markdown and "±" not in result.markdown.split("Bold:")[0]


def test_the_pair_point_estimate_is_the_mean_over_seeds_of_the_auc_difference(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / "runs" / f"s{seed}", seed=seed, rows=standard_rows())
    result = build_tables([tmp_path / "runs"], tmp_path / "out", replicates=20)
    (pair,) = [
        p
        for p in result.tables[0].pairs["video"]
        if (p["row"], p["reference"], p["column"]) == ("ties", "r2m", "unseen/grid")
    ]
    _, labels, video, _ = set_frames("unseen/grid")
    diffs = []
    for seed in (0, 1):
        per_video = {}
        for row, strength in (("ties", 2.0), ("r2m", 1.0)):
            frames = noisy(strength)(labels, video, "unseen/grid", seed)
            per_video[row] = plain_auc(np.bincount(video, frames) / np.bincount(video), labels[::3])
        diffs.append(per_video["ties"] - per_video["r2m"])
    assert pair["mean_diff"] == pytest.approx(np.mean(diffs), abs=1e-9)


def scaling_rows(strengths: dict[str, float]) -> dict:
    rows = {}
    for families in (["swap", "edit"], ["swap", "edit", "grid"]):
        n = len(families)
        unseen = [] if n == 3 else ["unseen/grid"]
        merged = ["in_distribution/swap", "in_distribution/edit"]
        for merger, strength in strengths.items():
            info = {
                "merger": merger,
                "families": families,
                "groups": {"merged": merged, "unseen": unseen} if unseen else {"merged": merged},
                "merge_seconds": 0.5 * n,
                "peak_memory_bytes": n * 2**30,
            }
            rows[f"{merger}@{'+'.join(families)}"] = (info, noisy(strength * n / 2))
    return rows


def test_scaling_rows_average_their_own_groups_and_plot_curves(tmp_path):
    for seed in (0, 1):
        write_run(
            tmp_path / "runs" / f"s{seed}",
            seed=seed,
            stage="scaling",
            overrides=["stage=scaling", f"seed={seed}"],
            rows=scaling_rows({"r2m": 1.5, "average": 0.5}),
        )
    result = build_tables([tmp_path / "runs"], tmp_path / "out", replicates=20)
    (table,) = result.tables
    assert [c.name for c in table.columns][-2:] == ["merged mean", "unseen mean"]
    assert "in_distribution mean" not in [c.name for c in table.columns]  # every row has groups
    assert table.cells["frame"][("r2m@swap+edit+grid", "unseen mean")].text() == ""  # no unseen family left
    assert table.cells["frame"][("r2m@swap+edit", "unseen mean")].complete
    (pair,) = [
        p
        for p in table.pairs["frame"]
        if (p["row"], p["reference"], p["column"]) == ("r2m@swap+edit", "average@swap+edit", "merged mean")
    ]  # the reference of a subset's merge is averaging of the same subset
    assert pair["sets"] == ["in_distribution/swap", "in_distribution/edit"] and pair["excludes_zero"] is not None
    others = {p["reference"] for p in table.pairs["frame"] if p["row"] == "r2m@swap+edit+grid"}
    assert others == {"average@swap+edit+grid"}
    plots = sorted(p.name for p in (tmp_path / "out" / "plots").glob("*.png"))
    assert plots == [
        "scaling_auc_frame.png",
        "scaling_auc_video.png",
        "scaling_scaling_cost.png",
        "scaling_scaling_frame.png",
    ]


def test_expansion_plots_a_curve_per_method_and_the_cost_per_step(tmp_path):
    rows = {}
    for step in (2, 3):
        groups = {"seen": ["in_distribution/swap", "in_distribution/edit"], "unseen": ["unseen/grid"]}
        rows[f"r2m@{step}"] = ({"merger": "r2m", "step": step, "cost_seconds": 3.0, "groups": groups}, noisy(1.0))
        rows[f"joint@{step}"] = (
            {"kind": "reference", "step": step, "cost_seconds": 30.0, "groups": groups},
            noisy(1.2),
        )
    write_run(tmp_path / "run", seed=0, stage="expansion", overrides=["stage=expansion", "seed=0"], rows=rows)
    build_tables([tmp_path / "run"], tmp_path / "out", replicates=20)
    names = {p.name for p in (tmp_path / "out" / "plots").glob("*.png")}
    assert {"expansion_expansion_frame.png", "expansion_expansion_cost.png"} <= names


def test_different_test_videos_across_seeds_are_refused(tmp_path):
    write_run(tmp_path / "runs" / "s0", seed=0, rows=standard_rows())
    other = write_run(tmp_path / "runs" / "s1", seed=1, rows=standard_rows())
    path = other / "scores" / "r2m" / "unseen__grid.videos.csv"
    path.write_text(path.read_text().replace("unseen/grid/v0,", "unseen/grid/elsewhere,"))
    with pytest.raises(ValueError, match="holds different videos"):
        build_tables([tmp_path / "runs"], tmp_path / "out", replicates=10)


def test_score_files_that_do_not_match_metrics_are_refused(tmp_path):
    run = write_run(tmp_path / "run", seed=0, rows=standard_rows())
    path = run / "scores" / "ties" / "in_distribution__swap.videos.csv"
    lines = path.read_text().splitlines()
    header, body = lines[0], [line.rsplit(",", 1)[0] + ",0.5" for line in lines[1:]]  # every video score 0.5
    path.write_text("\n".join([header, *body]) + "\n")
    with pytest.raises(ValueError, match="do not belong to this metrics.json"):
        build_tables([run], tmp_path / "out", replicates=10)


@pytest.mark.slow
def test_stage_tables_through_the_cli(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / "runs" / f"s{seed}", seed=seed, rows=standard_rows())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    out = tmp_path / "tables_run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "r2m_lab",
            "stage=tables",
            f"stage.runs=[{tmp_path / 'runs'}]",
            "stage.bootstrap=50",
            "debug=smoke",
            f"paths.root={tmp_path}",
            f"hydra.run.dir={out}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## pipeline: synthetic, frame-level AUC, 2 seeds (0, 1)" in proc.stdout
    for name in ("tables/pipeline.md", "tables/pipeline.csv", "tables/pipeline.tex", "tables/pairs_video.csv"):
        assert (out / name).is_file(), name
    assert json.loads((out / "tables.json").read_text())["bootstrap"]["replicates"] == 50
    logged = (out / "tables-pipeline" / "version_0" / "metrics.csv").read_text()  # debug=smoke logs to CSV
    assert "pipeline/frame/r2m/unseen/grid/auc_mean" in logged
    bad = subprocess.run(
        [sys.executable, "-m", "r2m_lab", "stage=tables", f"stage.runs=[{tmp_path / 'nope'}]", "debug=smoke"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and f"{tmp_path / 'nope'} does not exist" in bad.stderr
