"""Run discovery, expected jobs of a real Hydra multirun, missing/failed jobs with their relaunch command, refusals."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from r2m_lab.results.build import build_tables
from r2m_lab.results.runs import discover, expand_sweep, load_sweep
from tests.conftest import CONF
from tests.results_fixtures import hydra_sweep, job_folders, standard_rows, write_run


@pytest.fixture(scope="module")
def sweep_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 3-job multirun (seeds by range(0,3)) of the real config; jobs hold .hydra/ but no metrics yet."""
    root = tmp_path_factory.mktemp("sweep")
    return hydra_sweep(root, "stage=pipeline", "seed=range(0,3)", "backbone=tiny")


@pytest.fixture
def sweep(sweep_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template sweep (tests write metrics into its jobs)."""
    target = tmp_path / "multirun" / "2026-12-03" / "12-00-00"
    shutil.copytree(sweep_template, target)
    return target


def fill(sweep: Path, seeds: tuple[int, ...]) -> dict[int, Path]:
    """Write a successful run (metrics.json + scores) into the job of each seed; return every job by seed."""
    jobs = {}
    for overrides, folder in job_folders(sweep).items():
        seed = int(next(o for o in overrides if o.startswith("seed=")).split("=")[1])
        jobs[seed] = folder
        if seed in seeds:
            listed = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
            write_run(folder, seed=seed, rows=standard_rows(), overrides=listed)
    return jobs


def test_expected_jobs_from_a_real_multirun_yaml(sweep):
    loaded = load_sweep(sweep)
    assert {frozenset(j) for j in loaded.expected} == set(job_folders(sweep))
    assert len(loaded.expected) == 3
    config = copy.deepcopy(loaded.config)
    config["hydra"]["sweeper"]["params"] = {"merger": "average,r2m", "seed": "5,6"}  # seed: the task override wins
    jobs = expand_sweep(config, sweep)
    assert len(jobs) == 6
    assert jobs[0][:2] == ("merger=average", "seed=0")  # Hydra's order: sweeper params first, in their place
    assert {j[1] for j in jobs} == {"seed=0", "seed=1", "seed=2"}
    config["hydra"]["overrides"]["task"] = ["stage=pipeline", "rank_ratio=interval(0,1)"]
    with pytest.raises(ValueError, match="cannot expand the sweep"):
        expand_sweep(config, sweep)


def test_missing_seed_shows_in_cells_and_the_exact_relaunch_command(sweep, tmp_path):
    jobs = fill(sweep, seeds=(0, 1))
    result = build_tables([sweep], tmp_path / "out", replicates=50)
    (table,) = result.tables
    assert table.runs.seeds == [0, 1] and table.runs.missing_seeds == [2]
    for level in ("frame", "video"):
        texts = {cell.text() for cell in table.cells[level].values() if cell.applicable}
        assert texts == {"missing: seed 2"}  # never a mean over fewer seeds
        assert all(p["note"] == "missing: seeds 2" and "lo" not in p for p in table.pairs[level])
    root = sweep_template_root(sweep)
    command = (
        f"python -m r2m_lab -m -cd {CONF} -cn config stage=pipeline seed=2 backbone=tiny paths.root={root} "
        f"hydra.sweep.dir={sweep.resolve()}"
    )
    (job,) = result.missing
    assert job.command == command
    assert job.folder == jobs[2] and job.logs == [jobs[2] / "noop_app.log"]
    script = (tmp_path / "out" / "relaunch.sh").read_text().splitlines()
    assert script[-2:] == [f"cp -n {sweep}/multirun.yaml {sweep}/multirun.expected.yaml", command]
    assert command in result.markdown and str(jobs[2] / "noop_app.log") in result.markdown
    # the job folder gone altogether: still missing, same command, and the cells still say so
    shutil.rmtree(jobs[2])
    again = build_tables([sweep], tmp_path / "out2", replicates=50)
    assert [j.command for j in again.missing] == [command] and again.missing[0].reason.startswith("absent")
    assert again.tables[0].cells["frame"][("r2m", "unseen/grid")].text() == "missing: seed 2"


def sweep_template_root(sweep: Path) -> str:
    """The paths.root the template sweep was launched with (recorded in its task overrides)."""
    task = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["overrides"]["task"]
    return next(o for o in task if o.startswith("paths.root=")).split("=", 1)[1]


def test_complete_sweep_pools_three_seeds_and_writes_no_relaunch(sweep, tmp_path):
    fill(sweep, seeds=(0, 1, 2))
    result = build_tables([sweep], tmp_path / "out", replicates=50)
    (table,) = result.tables
    assert table.name == "pipeline" and table.runs.seeds == [0, 1, 2] and not result.missing
    assert not (tmp_path / "out" / "relaunch.sh").exists()
    assert "3 seeds (0, 1, 2)" in result.markdown and " ± " in table.cells["frame"][("r2m", "unseen/grid")].text()


def test_a_relaunch_that_overwrote_multirun_yaml_still_expects_the_original_jobs(sweep, tmp_path):
    fill(sweep, seeds=(0, 1))
    shutil.copy(sweep / "multirun.yaml", sweep / "multirun.expected.yaml")  # what relaunch.sh's cp -n keeps
    config = yaml.safe_load((sweep / "multirun.yaml").read_text())
    config["hydra"]["overrides"]["task"] = ["stage=pipeline", "seed=2", "backbone=tiny"]  # the relaunch's sweep
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(config))
    result = build_tables([sweep], tmp_path / "out", replicates=20)
    assert [j.seed for j in result.missing] == [2]


def test_mixed_theta0_is_refused_by_name(tmp_path):
    a = write_run(tmp_path / "runs" / "a", seed=0, rows=standard_rows(), theta0_hash="aaaa")
    b = write_run(tmp_path / "runs" / "b", seed=1, rows=standard_rows(), theta0_hash="bbbb")
    with pytest.raises(ValueError, match="theta0.hash") as err:
        build_tables([tmp_path / "runs"], tmp_path / "out", replicates=10)
    assert f"{a}: theta0.hash aaaa" in str(err.value) and f"{b}: theta0.hash bbbb" in str(err.value)


def test_mixed_benchmarks_are_refused_by_name(tmp_path):
    a = write_run(tmp_path / "a", seed=0, rows=standard_rows(), benchmark="synthetic")
    b = write_run(tmp_path / "b", seed=1, rows=standard_rows(), benchmark="ffpp")
    with pytest.raises(ValueError, match="benchmark") as err:
        build_tables([a, b], tmp_path / "out", replicates=10)
    assert f"{a}: benchmark synthetic" in str(err.value) and f"{b}: benchmark ffpp" in str(err.value)


def test_two_runs_of_one_seed_are_refused(tmp_path):
    a = write_run(tmp_path / "a", seed=0, rows=standard_rows())
    b = write_run(tmp_path / "b", seed=0, rows=standard_rows())
    with pytest.raises(ValueError, match=f"seed 0 has two successful runs, {a} and {b}"):
        build_tables([a, b], tmp_path / "out", replicates=10)


def test_different_overrides_make_different_tables(tmp_path):
    a = write_run(tmp_path / "a", seed=0, rows=standard_rows(), overrides=["seed=0", "backbone=tiny"])
    b = write_run(tmp_path / "b", seed=0, rows=standard_rows(), overrides=["seed=0", "backbone=clip_vit_b16"])
    result = build_tables([a, b], tmp_path / "out", replicates=10)
    assert sorted(t.name for t in result.tables) == ["pipeline_backbone=clip_vit_b16", "pipeline_backbone=tiny"]
    assert (tmp_path / "out" / "tables" / "pipeline_backbone=tiny.md").is_file()


def test_a_run_without_rows_or_metrics_is_failed_with_its_folder(tmp_path):
    write_run(tmp_path / "good", seed=0, rows=standard_rows())
    old = write_run(tmp_path / "old", seed=1, rows=standard_rows())
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["rows"], metrics["theta0"]  # a run report from before the table contract
    (old / "metrics.json").write_text(json.dumps(metrics))
    crashed = write_run(tmp_path / "crashed", seed=2, rows=standard_rows())
    (crashed / "metrics.json").unlink()
    (crashed / "__main__.log").write_text("Traceback ...")
    runs, _ = discover([tmp_path])
    status = {r.folder.name: r.problem for r in runs}
    assert status["good"] is None
    assert "lacks theta0, rows" in status["old"] and "no metrics.json" in status["crashed"]
    result = build_tables([tmp_path], tmp_path / "out", replicates=10)
    assert sorted(j.seed for j in result.missing) == [1, 2]
    assert f"log {crashed / '__main__.log'}" in result.markdown and str(old) in result.markdown
    assert result.tables[0].cells["frame"][("r2m", "unseen/grid")].text() == "missing: seeds 1, 2"


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"stage.runs: {tmp_path / 'nope'} does not exist"):
        discover([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no runs under {tmp_path / 'empty'}: searched"):
        discover([tmp_path / "empty"])
    with pytest.raises(ValueError, match="stage.runs is empty"):
        discover([])
