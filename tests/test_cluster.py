"""Cluster sweeps: the SLURM preset's job array (rendered by submitit, not submitted), a real two-job sweep through
submitit's local executor (each job in a process of its own), and failures reported across those processes."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf

from r2m_lab import failed_jobs
from r2m_lab.results.runs import Sweep
from tests.conftest import CONF
from tests.test_cli import run_cli


class Submitted(Exception):
    """Raised instead of calling sbatch; carries the submission script."""


def test_slurm_preset_submits_one_array_with_its_knobs(tmp_path, monkeypatch):
    import submitit.slurm.slurm as submitit_slurm

    # submitit refuses to build a SLURM executor where `srun` is not on the PATH; this one is never run
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    def capture(self, script_path):  # SlurmExecutor._make_submission_command: the script is written by now
        raise Submitted(Path(script_path).read_text())

    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "_make_submission_command", capture)
    knobs = ["partition=gpu", "gpus_per_node=4", "nodes=2", "timeout_min=90", "array_parallelism=3"]
    knobs += ["cpus_per_task=6", "mem_gb=200", "setup=[module load cuda]"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", *(f"hydra.launcher.{k}" for k in knobs), f"hydra.sweep.dir={tmp_path}"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher.tasks_per_node == 4  # one task per GPU, for Lightning's SLURMEnvironment
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    jobs = [[f"seed={s}"] for s in range(5)]
    with pytest.raises(Submitted) as submitted:
        launcher.launch(jobs, initial_job_idx=0)
    script = str(submitted.value)
    for line in [
        "#SBATCH --array=0-4%3",  # the five jobs as one array, at most three at once
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=200GB",
        "#SBATCH --time=90",
        "#SBATCH --signal=USR2@120",
        "module load cuda",
    ]:
        assert line in script.splitlines(), (line, script)
    assert f"{tmp_path}/.submitit/" in script  # the array's logs and pickles sit in the sweep folder


def test_relaunch_command_keeps_the_sweeps_launcher(tmp_path):
    config = {
        "hydra": {
            "runtime": {"config_sources": [{"provider": "main", "schema": "file", "path": str(CONF)}]},
            "job": {"config_name": "config"},
            "overrides": {
                "hydra": ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.mode=MULTIRUN"],
                "task": ["seed=0,1"],
            },
        }
    }
    sweep = Sweep(tmp_path, config, expected=[("seed=0",), ("seed=1",)], config_file=tmp_path / "multirun.yaml")
    command = sweep.relaunch_command(["seed=1"])
    assert command == (
        f"python -m r2m_lab -m -cd {CONF} -cn config seed=1 hydra/launcher=slurm hydra.launcher.partition=gpu "
        f"hydra.sweep.dir={tmp_path.resolve()}"
    )


def _job_config(sweep: Path, num: int, overrides: list[str]):
    return OmegaConf.create(
        {
            "hydra": {
                "mode": RunMode.MULTIRUN,
                "sweep": {"dir": str(sweep)},
                "runtime": {"output_dir": str(sweep / f"{num}_job")},
                "job": {"num": num, "name": "__main__"},
                "overrides": {"task": overrides},
            }
        }
    )


def test_failures_recorded_by_jobs_in_other_processes_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(failed_jobs, "FAILURES", [])
    monkeypatch.setattr(failed_jobs, "_SWEEP", {})
    sweep = tmp_path / "sweep"
    (sweep / "9_stale").mkdir(parents=True)
    (sweep / "9_stale" / failed_jobs.STATUS_FILE).write_text('{"status": "failed"}')  # an earlier command's job
    callback = failed_jobs.FailedJobs()
    callback.on_multirun_start(_job_config(sweep, 0, []))
    # what the jobs do in their own processes (submitit): states in their folders, nothing in this process's memory
    jobs = {n: _job_config(sweep, n, [f"seed={n}"]) for n in range(3)}
    for config in jobs.values():
        callback.on_job_start(config)
    done, failed = JobReturn(), JobReturn()
    done.status, done.return_value = JobStatus.COMPLETED, None
    failed.status, failed.return_value = JobStatus.FAILED, ValueError("bad rank\nmore")
    callback.on_job_end(jobs[0], pickle.loads(pickle.dumps(done)))  # submitit hands JobReturns back pickled
    callback.on_job_end(jobs[2], pickle.loads(pickle.dumps(failed)))
    failed_jobs.FAILURES.clear()  # job 2's process is gone; job 1 was killed before its end
    stream = io.StringIO()
    assert failed_jobs.report(stream) == 2
    text = stream.getvalue()
    assert text.startswith("2 job(s) failed:\n  job 1 (seed=1): did not finish")
    assert f"log: {sweep / '1_job' / '__main__.log'}" in text
    assert "job 2 (seed=2): ValueError: bad rank\n" in text and "stale" not in text


@pytest.mark.slow
def test_two_job_sweep_through_submitits_local_executor(tmp_path):
    # job 0 trains the smoke specialists, merges and evaluates; job 1's knob is refused in its own process: both end
    proc = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "stage=merge",
        "merger=r2m",
        "stage.evaluate=true",
        "debug=smoke",
        "rank_ratio=0.1,2",
        "+hydra.callbacks.tables._target_=r2m_lab.results.callback.BuildTables",
        root=tmp_path,
        timeout=600,
    )
    assert proc.returncode != 0  # Hydra re-raises the failed job
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    ok, bad = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert "rank_ratio=0.1" in ok.name and "rank_ratio=2" in bad.name
    assert (ok / "metrics.json").is_file() and '"completed"' in (ok / failed_jobs.STATUS_FILE).read_text()
    assert len(list((tmp_path / "artifacts" / "merged").rglob("r2m-*.safetensors"))) == 1
    # each job ran in a submitit process of its own and handed its result back as a pickle
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
    # the failure, reported by the launching process although it happened in the job's process
    assert "1 job(s) failed:" in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("  job 1 (")]
    assert "rank_ratio=2" in line and "rank_ratio must be a fraction in (0, 1]" in line
    assert str(bad / "__main__.log") in proc.stderr and "Traceback" in (bad / "__main__.log").read_text()
    # the sweep's tables callback ran in the launching process and read both job folders (stage=merge jobs make no
    # table rows, so both are listed as missing), and relaunch.sh sends jobs back through the same launcher
    report = json.loads((sweep / "tables" / "tables.json").read_text())
    assert sorted(Path(r["folder"]).name for r in report["runs"]) == [ok.name, bad.name]
    relaunch = (sweep / "tables" / "relaunch.sh").read_text()
    assert "rank_ratio=2" in relaunch and "hydra/launcher=submitit_local" in relaunch
