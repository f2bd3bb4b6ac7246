"""Every notebook runs headless against artifacts the tests trained, and its outputs are stripped in git."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_is_stripped(path: Path, trained_root: Path, tmp_path: Path, monkeypatch):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code), "strip outputs"
    monkeypatch.setenv("R2M_REPO", str(REPO))
    monkeypatch.setenv("R2M_ROOT", str(trained_root))
    monkeypatch.setenv("R2M_OVERRIDES", "debug=smoke")
    monkeypatch.setenv("R2M_NOTEBOOK_OUT", str(tmp_path))
    namespace: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(code):
        source = "".join(cell["source"])
        exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)  # noqa: S102 — our own notebook
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["gram_spectrum.png", "task_vector_norm_per_block.png"]
