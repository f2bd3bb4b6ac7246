"""The merge benchmark script runs end to end (on a tiny ViT): fixtures, one subprocess per merger, the report."""

from __future__ import annotations

import json

import pytest

from r2m_lab import bench


@pytest.mark.slow
def test_bench_merge_smoke(tmp_path):
    assert bench.main(["--arch", "vit_tiny", "--n", "2", "--merger", "average", "r2m", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "merge_report.json").read_text())
    rows = {row["merger"]: row for row in report["rows"]}
    assert set(rows) == {"read", "average", "r2m"}
    for row in rows.values():
        assert row["merge_s"] > 0 and 0.1 < row["peak_rss_gb"] < 24, row
    assert rows["r2m"]["phases_s"]["pass2_residuals"] > 0 and rows["average"]["x_read"] > 0
    assert "| vit_tiny | 2 | r2m |" in (tmp_path / "merge_report.md").read_text()
    # the fixtures are cached: a second run reuses the specialists it wrote
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "fixtures").rglob("*.safetensors")}
    assert bench.main(["--arch", "vit_tiny", "--n", "2", "--merger", "average", "--out", str(tmp_path)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
