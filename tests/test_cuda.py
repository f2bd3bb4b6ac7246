"""``device=cuda``: checkpoints read onto the GPU and a merge there gives the CPU's weights (skipped without CUDA)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import merged_path, specialist_path
from r2m_lab.weights import Checkpoint
from tests.conftest import compose_config

pytestmark = pytest.mark.gpu


def test_checkpoint_tensors_land_on_the_gpu(trained_root):
    path = specialist_path(compose_config(trained_root), "synthetic_swap")
    on_gpu, on_cpu = Checkpoint(path, device="cuda"), Checkpoint(path, device="cpu")
    key = next(iter(on_gpu.backbone))
    assert on_gpu.backbone[key].device.type == "cuda"
    assert torch.equal(on_gpu.backbone[key].cpu(), on_cpu.backbone[key])


@pytest.mark.parametrize("merger", ["average", "ties", "r2m"])
def test_a_merge_on_the_gpu_matches_the_cpu(trained_root, tmp_path, merger):
    weights = {}
    for device in ("cpu", "cuda"):
        root = tmp_path / device
        shutil.copytree(trained_root / "artifacts", root / "artifacts", ignore=shutil.ignore_patterns("merged"))
        cfg = compose_config(root, ["stage=merge", f"merger={merger}", f"device={device}"])
        card = run_stage(cfg)
        assert Path(card["checkpoint_path"]) == merged_path(cfg, cfg.merger)
        weights[device] = Checkpoint(card["checkpoint_path"]).backbone_state()
    assert weights["cpu"].keys() == weights["cuda"].keys()
    for key, value in weights["cpu"].items():
        # float64 SVDs and sums on two devices: equal to rounding, not bit for bit
        torch.testing.assert_close(weights["cuda"][key], value, rtol=1e-5, atol=1e-6, msg=key)
