"""Every paper sweep of experiments/ end to end on the smoke preset: sweep → tables built when it ends → files.

One root for all of them, as a user would run them: the main tables train each seed's specialists, the other sweeps
reuse them. The size knobs below only shrink the smoke runs (fewer mergers and subsets); the sweeps themselves are
the literal files of experiments/. A failed job is then re-launched with the exact command the builder printed.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from r2m_lab.stages.artifacts import base_path, specialist_path
from tests.conftest import REPO, compose_config
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


def test_every_paper_sweep_builds_its_tables_and_a_failed_job_is_relaunched_exactly(tmp_path):
    real = compose_config(tmp_path, smoke=False)  # files at the real recipe's paths: the smoke runs leave them alone
    placeholders = [base_path(real), *(specialist_path(real, n) for n in ("synthetic_swap", "synthetic_joint"))]
    for i, path in enumerate(placeholders):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a real artifact %d" % i)

    # main tables, three seeds: every row, mean ± std, intervals against r2m and average
    folder, proc = sweep(tmp_path, "main_tables")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = tables_of(folder)
    (table,) = summary["tables"]
    assert table["seeds"] == [0, 1, 2] and not summary["missing"]
    rows = table["row_order"]
    assert rows[:4] == [f"specialist:{k}" for k in ("swap", "reenact", "synthesis", "edit")]
    assert rows[4:6] == ["joint", "ensemble"] and {"r2m", "r2m_kit", "average", "ties"} <= set(rows)
    pairs = (folder / "tables" / "tables" / "pairs_frame.csv").read_text()
    assert "r2m_kit,r2m," in pairs and "ties,average," in pairs
    assert "±" in proc.stdout  # the Markdown printed when the sweep ended

    # the other tables, two seeds each, on the same specialists (nothing retrained: θ₀ and seed-0 specialists kept)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts" / "specialists").rglob("*.safetensors")}
    for name, extra in (
        ("r2m_ablation", ["seed=0,1"]),
        ("scaling", ["seed=0,1", *FEW, "stage.sizes=[2,4]", "stage.max_subsets=2", "stage.measure_memory=false"]),
        ("expansion", ["seed=0,1", *FEW, "stage.start=3"]),
        ("head_ablation", ["seed=0,1", *FEW, "stage.heads=[average,specialist:swap,refit]"]),
    ):
        folder, proc = sweep(tmp_path, name, *extra)
        assert proc.returncode == 0, (name, proc.stdout[-3000:] + proc.stderr[-3000:])
        (table,) = tables_of(folder)["tables"]
        assert table["seeds"] == [0, 1], name
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [p.read_bytes() for p in placeholders] == [b"a real artifact %d" % i for i in range(len(placeholders))]

    # a failed job: its cells say which seed is missing, and the printed command re-launches exactly that job
    folder = tmp_path / "multirun" / "r2m_ablation"
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
    proc = run_cli(*command[3:], root=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (table,) = tables_of(folder)["tables"]  # rebuilt when the relaunch ended: complete again
    assert table["seeds"] == [0, 1]
    assert not json.loads((folder / "tables" / "tables.json").read_text())["missing"]
