"""Every notebook runs headless against artifacts the tests trained, writes the figures it promises, and its outputs
are stripped in git."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# The PNGs each notebook writes into R2M_NOTEBOOK_OUT (its top level: the stage=analyze runs some notebooks make keep
# their own figures in a sub-folder). A new notebook needs an entry here.
EXPECTED_FIGURES = {
    "task_vectors": ["gram_spectrum.png", "task_vector_norm_per_block.png"],
    "averaging": ["averaging_heads.png", "averaging_real_vs_fake_similarity.png", "averaging_separation_angles.png"],
    "real_subspace": ["subspace_energy_by_layer.png", "subspace_residual_rank.png", "subspace_spectrum.png"],
    "eta_puzzle": ["eta_puzzle_curves.png", "eta_puzzle_step_size.png"],
    "interference": ["interference_by_layer.png", "interference_family_auc.png"],
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_every_notebook_promises_its_figures():
    assert sorted(EXPECTED_FIGURES) == sorted(p.stem for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_is_stripped(path: Path, trained_root: Path, tmp_path: Path, monkeypatch):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code), "strip outputs"
    assert any(c["cell_type"] == "markdown" for c in nb["cells"]), "a notebook explains what it shows"
    # The specialists only, in a root of this test's own: notebooks may merge, and the session root is shared.
    root = tmp_path / "root"
    shutil.copytree(trained_root / "artifacts", root / "artifacts", ignore=shutil.ignore_patterns("merged"))
    if (trained_root / "cache").is_dir():
        shutil.copytree(trained_root / "cache", root / "cache")  # the generated benchmark: same config, same data
    out = tmp_path / "out"
    monkeypatch.setenv("R2M_REPO", str(REPO))
    monkeypatch.setenv("R2M_ROOT", str(root))
    monkeypatch.setenv("R2M_OVERRIDES", "debug=smoke")
    monkeypatch.setenv("R2M_NOTEBOOK_OUT", str(out))
    namespace: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(code):
        source = "".join(cell["source"])
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)  # noqa: S102 — our own notebook
    figures = sorted(out.glob("*.png"))
    assert [p.name for p in figures] == sorted(EXPECTED_FIGURES[path.stem])
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE and p.stat().st_size > 1000 for p in figures)
