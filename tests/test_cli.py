"""The real CLI in a subprocess (slow): the user's literal commands, multirun, and error messages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run_cli(*args: str, root: Path, timeout: int = 300, wandb_mode: str = "disabled") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": wandb_mode}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "r2m_lab", *args, f"paths.root={root}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_multirun_merge_sweep(trained_root, tmp_path):
    # the specialists only: other tests may have merged into the shared session root
    shutil.copytree(trained_root / "artifacts", tmp_path / "artifacts", ignore=shutil.ignore_patterns("merged"))
    proc = run_cli("-m", "stage=merge", "merger=average,task_arithmetic", "debug=smoke", root=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "multirun").glob("*/*/*/metrics.json"))
    assert len(runs) == 2
    names = sorted(p.parent.name for p in runs)
    assert names[0].startswith("0_") and "merger=average" in names[0] and "paths.root" not in names[0]
    assert names[1].startswith("1_") and "merger=task_arithmetic" in names[1]
    assert len(list((tmp_path / "artifacts" / "merged").rglob("*.safetensors"))) == 2


def test_user_merge_command_literally(trained_root, tmp_path):
    # the specialists only: other tests may have merged into the shared session root
    shutil.copytree(trained_root / "artifacts", tmp_path / "artifacts", ignore=shutil.ignore_patterns("merged"))
    proc = run_cli("stage=merge", "merger=r2m", "rank_ratio=0.1", "debug=smoke", root=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (card,) = (tmp_path / "artifacts" / "merged").rglob("r2m-*.json")
    assert '"rank_ratio": 0.1' in card.read_text()


def test_finetune_without_data_names_the_index(tmp_path):
    proc = run_cli("stage=finetune", "data=faceforensics_df", root=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert str(tmp_path / "data" / "dataset_json" / "FF-DF.json") in proc.stderr


def test_unknown_merger_lists_choices(tmp_path):
    proc = run_cli("merger=nope", root=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Available options" in proc.stderr and "task_arithmetic" in proc.stderr


def test_help_lists_groups(tmp_path):
    proc = run_cli("--help", root=tmp_path, timeout=120)
    assert proc.returncode == 0
    mergers = ", ".join(sorted(p.stem for p in (REPO / "conf" / "merger").glob("*.yaml")))
    assert f"merger: {mergers}" in proc.stdout


def test_finetune_logs_an_offline_wandb_run_and_says_why_it_is_not_online(tmp_path):
    # WANDB_MODE=offline in the environment beats logger.offline=false: the run stays offline, and the log says so
    proc = run_cli(
        "stage=finetune",
        "data=synthetic_swap",
        "debug=smoke",
        "logger=wandb",
        "logger.offline=false",
        root=tmp_path,
        wandb_mode="offline",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*_finetune")
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "an offline W&B run with its data file"
    assert (run_dir / "metrics.json").is_file()
    log = (run_dir / "__main__.log").read_text()
    assert "logger.offline=false asks for an online W&B run, but WANDB_MODE=offline" in log


def test_merger_sweep_runs_every_merger_from_a_fresh_checkout_and_leaves_real_artifacts_alone(tmp_path):
    """merger_sweep with debug=smoke, in a root that holds nothing of the smoke recipe but has files at every path
    the real recipe uses (the paper's sweeps: tests/test_paper_sweeps.py)."""
    from r2m_lab.stages.artifacts import base_path, specialist_path
    from tests.conftest import compose_config

    real = compose_config(tmp_path, smoke=False)
    placeholders = [base_path(real), *(specialist_path(real, n) for n in ("synthetic_swap", "synthetic_joint"))]
    for i, path in enumerate(placeholders):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a real artifact %d" % i)
    experiments = str(REPO / "experiments")
    proc = run_cli("-cd", experiments, "-cn", "merger_sweep", "debug=smoke", root=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    job_dirs = [d for d in sweep.iterdir() if d.is_dir()]
    from r2m_lab.mergers import merger_names

    assert len(job_dirs) == len(merger_names()) and all((d / "metrics.json").is_file() for d in job_dirs)
    assert [p.read_bytes() for p in placeholders] == [b"a real artifact %d" % i for i in range(len(placeholders))]


def test_every_failed_sweep_job_is_reported_and_logged_in_its_own_folder(tmp_path):
    proc = run_cli(
        "-m", "stage=evaluate", "stage.model=specialist:nope_a,specialist:nope_b", "debug=smoke", root=tmp_path
    )
    assert proc.returncode != 0
    assert "2 job(s) failed:" in proc.stderr
    for name in ("nope_a", "nope_b"):
        (job,) = (tmp_path / "multirun").glob(f"*/*/*{name}*")  # Hydra escapes the colon in the folder name
        log = (job / "__main__.log").read_text()
        assert "Traceback" in log and f"model='specialist:{name}'" in log
        assert f"stage.model=specialist\\:{name}" in proc.stderr and str(job / "__main__.log") in proc.stderr


def test_a_missing_specialist_names_the_command_with_this_runs_recipe(tmp_path):
    proc = run_cli("stage=merge", "merger=average", "debug=smoke", "train_missing=false", root=tmp_path, timeout=120)
    assert proc.returncode != 0
    command = f"python -m r2m_lab stage=finetune data=synthetic_swap debug=smoke paths.root={tmp_path}"
    assert command in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "artifacts").exists()


def test_sweep_files_compose(tmp_path):
    for sweep in sorted((REPO / "experiments").glob("*.yaml")):
        proc = run_cli("-cd", str(REPO / "experiments"), "-cn", sweep.stem, "--cfg", "hydra", root=tmp_path)
        assert proc.returncode == 0, (sweep.name, proc.stderr[-2000:])
        assert "mode: MULTIRUN" in proc.stdout and "params:" in proc.stdout, sweep.name
