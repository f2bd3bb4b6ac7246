"""python -m r2m_lab.analysis.summary: several stage=analyze runs read side by side (mean ± std, each run's value)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r2m_lab.analysis import summary

ETAS = [0.0, 1.0, 3.0, 8.0, 12.0]
LAMS = [0.0, 1.0, 2.0]


def payload(seed: int, pooled_eta: list[float], pooled_lam: list[float], residual: float = 0.2) -> dict:
    """A stage=analyze payload with the fields the summary reads (two families, one merged model)."""
    fams = ["swap", "edit"]

    def point(key: str, value: float, auc: float) -> dict:
        return {key: value, "auc": {"pooled": auc, "swap": auc + 0.01, "edit": auc - 0.01}}

    sim = {
        f: {
            "real": {f"specialist:{f}|merged:average": {"cka": 0.9, "mean_cosine": 0.8, "frames": 4}},
            "fake": {f"specialist:{f}|merged:average": {"cka": 0.6 + 0.1 * seed, "mean_cosine": 0.5, "frames": 4}},
        }
        for f in fams
    }
    return {
        "stage": "analyze",
        "split": "val",
        "benchmark": "synthetic",
        "seed": seed,
        "frames": {f: {"real": 4, "fake": 4} for f in fams},
        "merged": {"merged:average": "/x.safetensors"},
        "curves": {
            "split": "val",
            "eta": [point("eta", e, a) for e, a in zip(ETAS, pooled_eta, strict=True)],
            "lambda": [point("lambda", e, a) for e, a in zip(LAMS, pooled_lam, strict=True)],
        },
        "spectra": {
            "gram": {"families": fams, "energy_share": [0.7, 0.3]},
            "real_subspace": {
                "families": fams,
                "subspace_fraction": {"swap": 0.5, "edit": 0.4},
                "core_norm": 1.0,
                "residual_norm": residual,
                "residual_norms_before": {"swap": 1.0, "edit": 1.4},
                "residual_norms_after": {"swap": 0.9, "edit": 1.3},
            },
        },
        "similarity": {"split": "val", "families": sim},
        "directions": {
            "pairs": {
                f"specialist:{f}|merged:average": {f: 20.0 + seed, "swap" if f == "edit" else "edit": 80.0}
                for f in fams
            },
            "heads": {"labels": ["a", "b"], "cosines": [[1.0, 0.9], [0.9, 1.0]]},
        },
        "interference": {
            "merged:average": {
                "groups": ["embed", "head"],
                "families": {
                    f: {"specialist_auc": 0.9, "merged_auc": 0.7, "delta": {"embed": -0.1, "head": 0.0}} for f in fams
                },
            }
        },
    }


def write(root: Path, name: str, data: dict) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "analysis.json").write_text(json.dumps(data))
    return root / name


def test_headline_numbers_are_mean_and_sample_std_over_the_runs(tmp_path, capsys):
    a = write(tmp_path, "seed0", payload(0, [0.80, 0.78, 0.75, 0.90, 0.85], [0.5, 0.8, 0.7]))
    b = write(tmp_path, "seed1", payload(1, [0.84, 0.80, 0.79, 0.86, 0.88], [0.5, 0.8, 0.6], residual=0.3))
    assert summary.main([str(a), str(b / "analysis.json"), "--out", str(tmp_path / "s.md")]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "s.md").read_text() == text
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("|")}
    assert lines["η = 8"] == "| η = 8 | 0.880 ± 0.028 | 0.900 | 0.860 |"
    assert lines["best η"] == "| best η | 10.000 ± 2.828 | 8.000 | 12.0 |"  # 8 for seed 0, 12 for seed 1
    assert lines["η of the dip before the best η"].endswith("| 3.000 | 3.000 |")
    # η_match = mean(1.0, 1.4) / ‖τ_res‖: 1.2 / 0.2 = 6 and 1.2 / 0.3 = 4
    assert lines["η_match = meanᵢ‖rᵢ‖ / ‖τ_res‖"] == "| η_match = meanᵢ‖rᵢ‖ / ‖τ_res‖ | 5.000 ± 1.414 | 6.000 | 4.000 |"
    assert lines["best λ"].endswith("| 1.000 | 1.000 |")
    assert lines["merged:average: linear CKA, real frames"].endswith("| 0.900 | 0.900 |")
    assert lines["merged:average: linear CKA, fake frames"].endswith("| 0.600 | 0.700 |")
    # only the specialist's own family counts (the 80° cross-family angles do not)
    assert lines["merged:average: angle of fake − real directions, own family (°)"].endswith("| 20.0 | 21.0 |")
    assert lines["lowest cosine between two heads' directions"].endswith("| 0.900 | 0.900 |")
    assert lines["merged:average: embed"].endswith("| -0.100 | -0.100 |")
    assert lines["merged:average on each specialist's family: AUC"].endswith("| 0.700 | 0.700 |")


def test_runs_that_measured_other_grids_are_refused_by_name(tmp_path):
    a = write(tmp_path, "seed0", payload(0, [0.8] * 5, [0.5] * 3))
    other = payload(1, [0.8] * 5, [0.5] * 3)
    other["curves"]["eta"][1]["eta"] = 2.0
    b = write(tmp_path, "seed1", other)
    with pytest.raises(ValueError, match="run seed1 measured another eta grid"):
        summary.load_runs([a, b])


def test_a_folder_without_an_analysis_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage=analyze"):
        summary.load_runs([tmp_path])


def test_a_part_some_runs_lack_is_reported_for_the_others(tmp_path):
    a = write(tmp_path, "seed0", payload(0, [0.8] * 5, [0.5] * 3))
    lacking = payload(1, [0.8] * 5, [0.5] * 3)
    del lacking["interference"]
    b = write(tmp_path, "seed1", lacking)
    text = summary.summary_markdown(summary.load_runs([a, b]))
    assert "No interference in ['seed1']." in text


def test_a_sweep_folder_reads_its_jobs_in_launch_order(tmp_path):
    for job, seed in (("10_seed=2", 2), ("9_seed=1", 1), ("0_seed=0", 0)):
        write(tmp_path, job, payload(seed, [0.8] * 5, [0.5] * 3))
    runs = summary.load_runs([tmp_path])
    assert [r["seed"] for r in runs.values()] == [0, 1, 2]  # 0_seed=0, 9_seed=1, 10_seed=2
    assert list(runs) == ["seed0", "seed1", "seed2"]  # one run per seed: named by it


def test_runs_of_one_seed_keep_their_folder_names(tmp_path):
    a = write(tmp_path, "steps300", payload(0, [0.8] * 5, [0.5] * 3))
    b = write(tmp_path, "steps1200", payload(0, [0.8] * 5, [0.5] * 3))
    assert list(summary.load_runs([a, b])) == ["steps300", "steps1200"]
    with pytest.raises(ValueError, match="the same run was given twice"):
        summary.load_runs([a, a])
