"""The benchmark scripts run end to end on tiny sizes: the merge benchmark (a tiny ViT: fixtures, one subprocess per
merger, the report) and the training-throughput one (the tiny backbone on CPU: PNG crops, three measurements)."""

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
        # setup (open, compose the config) is reported apart from the merge; the total is what a user waits for
        assert row["setup_s"] > 0 and row["total_s"] == pytest.approx(row["setup_s"] + row["merge_s"] + row["save_s"])
    assert rows["r2m"]["phases_s"]["pass2_residuals"] > 0 and rows["average"]["x_read"] > 0
    read = rows["read"]
    expected = rows["average"]["total_s"] / (read["total_s"] + rows["average"]["save_s"])
    assert rows["average"]["x_read_write"] == pytest.approx(expected)
    assert "read+write: " in rows["average"]["targets"]
    assert "| vit_tiny | 2 | r2m |" in (tmp_path / "merge_report.md").read_text()
    # the fixtures are cached: a second run reuses the specialists it wrote
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "fixtures").rglob("*.safetensors")}
    assert bench.main(["--arch", "vit_tiny", "--n", "2", "--merger", "average", "--out", str(tmp_path)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    from r2m_lab import bench_train

    args = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--frames", "16", "--crop", "48"]
    assert bench_train.main([*args, "--workers", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["machine"]["frames"]["count"] == 16 and report["machine"]["frames"]["mean_kb"] > 0
    (row,) = report["rows"]  # --device cpu: the tiny backbone only; the CLIP rows are listed as not run
    assert {r["backbone"] for r in report["not_run"]} == {"clip_vit_b16", "clip_vit_l14"}
    assert (row["backbone"], row["device"], row["precision"], row["num_workers"]) == ("tiny", "cpu", "fp32", 1)
    assert row["persistent_workers"] and row["augment"] == ["flip"] and row["input_size"] == 64
    for key in ("model_images_per_s", "data_images_per_s", "pipeline_images_per_s"):
        assert row[key] > 0, (key, row)
    assert row["pipeline_over_model"] == row["pipeline_images_per_s"] / row["model_images_per_s"]
    slower = "data loading" if row["data_images_per_s"] < row["model_images_per_s"] else "model"
    assert row["bottleneck"] == slower
    text = (tmp_path / "train_report.md").read_text()
    assert "| tiny | cpu | fp32 | 4 | 64 | 1 |" in text and "| clip_vit_l14 | — |" in text and "not run: " in text
    assert len(list((tmp_path / "fixtures").glob("frames-*/*.png"))) == 16
