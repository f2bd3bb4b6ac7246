"""Every paper sweep of experiments/ end to end on the smoke preset: sweep → tables built when it ends → files.

The sweeps are the literal files of experiments/; only their size is shrunk on the command line (fewer seeds, mergers
and subsets), which the tests check against the files' own seeds. Two tests, so that the suite's workers run them
side by side: the main tables (two seeds, then a failed job re-launched with the exact command the builder printed),
and the other four tables on one root, where the first sweep trains the specialists and the others reuse them.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from r2m_lab.stages.artifacts import base_path, specialist_path
from tests.conftest import CONF, REPO, compose_config
from tests.test_cli import run_cli

pytestmark = pytest.mark.slow

EXPERIMENTS = str(REPO / "experiments")
FEW = ["stage.mergers=[average,r2m]"]  # smoke-size: two mergers (+ the r2m_kit variant) per subset or step


def sweep(root: Path, name: str, *overrides: str) -> tuple[Path, subprocess.CompletedProcess]:
    folder = root / "multirun" / name
    proc = run_cli("-cd", EXPERIMENTS, "-cn", name, "debug=smoke", *overrides, f"hydra.sweep.dir={folder}", root=root)
    return folder, proc


def tables_of(folder: Path) -> dict:
    summary = json.loads((folder / "tables" / "tables.json").read_text())
    assert (folder / "tables" / "tables").is_dir() and list((folder / "tables" / "plots").glob("*.png"))
    return summary


@pytest.mark.parametrize("name", ["main_tables", "r2m_ablation", "scaling", "expansion", "head_ablation"])
def test_every_paper_sweep_file_sweeps_training_seeds_0_1_2(name):
    # the runs below shrink the seeds on the command line: the files themselves sweep the three seeds of the tables
    # `-cd experiments` adds the folder beside conf/, where the sweeps find `config`: the same search path here
    with initialize_config_dir(config_dir=EXPERIMENTS, version_base="1.3"):
        cfg = compose(config_name=name, overrides=[f"hydra.searchpath=[file://{CONF}]"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.seed == "0,1,2"
    assert cfg.hydra.callbacks.tables._target_ == "r2m_lab.results.callback.BuildTables"


def test_main_tables_sweep_builds_its_tables_and_a_failed_job_is_relaunched_exactly(tmp_path):
    real = compose_config(tmp_path, smoke=False)  # files at the real recipe's paths: the smoke runs leave them alone
    placeholders = [base_path(real), *(specialist_path(real, n) for n in ("synthetic_swap", "synthetic_joint"))]
    for i, path in enumerate(placeholders):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a real artifact %d" % i)

    # main tables, two seeds: every row, mean ± std, intervals against r2m and average
    folder, proc = sweep(tmp_path, "main_tables", "seed=0,1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (table,) = tables_of(folder)["tables"]
    assert table["seeds"] == [0, 1] and not tables_of(folder)["missing"]
    rows = table["row_order"]
    assert rows[:4] == [f"specialist:{k}" for k in ("swap", "reenact", "synthesis", "edit")]
    assert rows[4:6] == ["joint", "ensemble"] and {"r2m", "r2m_kit", "average", "ties"} <= set(rows)
    pairs = (folder / "tables" / "tables" / "pairs_frame.csv").read_text()
    assert "r2m_kit,r2m," in pairs and "ties,average," in pairs
    assert "±" in proc.stdout  # the Markdown printed when the sweep ended
    assert [p.read_bytes() for p in placeholders] == [b"a real artifact %d" % i for i in range(len(placeholders))]

    # a failed job: its cells say which seed is missing, and the printed command re-launches exactly that job
    (job,) = [d for d in folder.iterdir() if d.name.endswith("seed=1")]
    (job / "metrics.json").unlink()
    proc = run_cli("stage=tables", f"stage.runs=[{folder}]", "debug=smoke", root=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "missing: seed 1" in proc.stdout
    (run,) = (tmp_path / "outputs").glob("*/*_tables")
    relaunch = (run / "relaunch.sh").read_text().splitlines()
    command = shlex.split(relaunch[-1])
    assert command[:4] == ["python", "-m", "r2m_lab", "-m"] and "seed=1" in command
    subprocess.run(shlex.split(relaunch[-2]), check=True)  # keeps the sweep's multirun.yaml, as the script does
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts" / "specialists").rglob("*.safetensors")}
    proc = run_cli(*command[3:], root=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the relaunched job reuses seed 1's specialists
    (table,) = tables_of(folder)["tables"]  # rebuilt when the relaunch ended: complete again
    assert table["seeds"] == [0, 1]
    assert not json.loads((folder / "tables" / "tables.json").read_text())["missing"]


def test_the_other_paper_sweeps_build_their_tables_on_the_same_specialists(tmp_path):
    # the R²M ablations train seed 0's θ₀ and specialists (smoke: train_missing); the other sweeps retrain nothing
    folder, proc = sweep(tmp_path, "r2m_ablation", "seed=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (table,) = tables_of(folder)["tables"]
    assert table["seeds"] == [0] and {"r2m", "k=2", "truncation=false"} <= set(table["row_order"])
    trained = [p for p in (tmp_path / "artifacts").rglob("*.safetensors") if "merged" not in p.parts]
    stamps = {p: p.stat().st_mtime_ns for p in trained}
    assert len(stamps) == 5  # θ₀ and the four specialists
    for name, extra in (
        ("scaling", [*FEW, "stage.sizes=[2,4]", "stage.max_subsets=2", "stage.measure_memory=false"]),
        ("expansion", [*FEW, "stage.start=3"]),
        ("head_ablation", [*FEW, "stage.heads=[average,specialist:swap,refit]"]),
    ):
        folder, proc = sweep(tmp_path, name, "seed=0", *extra)
        assert proc.returncode == 0, (name, proc.stdout[-3000:] + proc.stderr[-3000:])
        (table,) = tables_of(folder)["tables"]
        assert table["seeds"] == [0], name
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
