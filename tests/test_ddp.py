"""Trainer presets: DDP on CPU (two gloo processes, the real CLI), a GPU preset without a GPU, DDP on one device, and
the GPU preset's switches (compile, channels-last, fused optimizer) on CPU."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from r2m_lab.data.loaders import balanced_sampler
from r2m_lab.stages import devices
from r2m_lab.stages.artifacts import base_path, specialist_path
from r2m_lab.stages.base_model import ensure_base
from r2m_lab.stages.finetune import train_detector
from r2m_lab.weights import Checkpoint
from tests.conftest import REPO, compose_config

CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
DRAWN = re.compile(r"rank (\d+) step (\d+) frames \[([\d, ]*)\]")


def run_cli(*args: str, root: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, "-m", "r2m_lab", *args, f"paths.root={root}"],
        cwd=root,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def drawn_frames(log_file: Path) -> dict[int, list[list[int]]]:
    """{rank: [frame indices of each training step]} from a run's debug log lines (the fine-tune's, not θ₀'s)."""
    out: dict[int, list[list[int]]] = {}
    text = log_file.read_text()
    for rank, _, frames in DRAWN.findall(text[text.index("Fine-tuning specialist") :]):
        out.setdefault(int(rank), []).append([int(f) for f in frames.split(",") if f.strip()])
    return out


@pytest.mark.slow
def test_ddp_on_cpu_trains_a_specialist_on_two_processes(tmp_path):
    cfg = compose_config(tmp_path, CPU_DDP)
    ensure_base(cfg)  # θ₀ in this process (one process makes it, the CLI's ranks read it), to keep the test short
    proc = run_cli("stage=finetune", "debug=smoke", *CPU_DDP, "hydra.verbose=r2m_lab.detector", root=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # the second process wrote into the first one's Hydra run folder
    run = runs[0]
    recipe = cfg.backbone.recipe

    # the card records how it was trained; the recipe's batch is the global batch, split over the two ranks
    card = json.loads((run / "metrics.json").read_text())
    assert card == Checkpoint(specialist_path(cfg, "synthetic_swap")).card()
    dist = card["distributed"]
    assert (dist["world_size"], dist["devices"], dist["num_nodes"], dist["strategy"]) == (2, 2, 1, "DDPStrategy")
    assert (dist["global_batch_size"], dist["per_device_batch_size"]) == (recipe.batch_size, recipe.batch_size // 2)

    # each rank drew its own shard of the balanced sampler's draws, for the recipe's number of steps
    main_log, child_log = run / "__main__.log", run / "train_ddp_process_1.log"
    drawn = {**drawn_frames(main_log), **drawn_frames(child_log)}
    assert set(drawn_frames(main_log)) == {0} and set(drawn_frames(child_log)) == {1}
    for rank in (0, 1):
        assert len(drawn[rank]) == recipe.max_steps, rank
        assert all(len(batch) == recipe.batch_size // 2 for batch in drawn[rank])
    train = instantiate(cfg.data).frames("train")
    # the sampler yields (augmentation seed, frame index) draws; the ranks log frame indices
    draws = [frame for _, frame in balanced_sampler(train.labels, recipe.max_steps * recipe.batch_size, int(cfg.seed))]
    shards = [sum(drawn[rank], []) for rank in (0, 1)]
    assert Counter(shards[0]) + Counter(shards[1]) == Counter(draws)  # together: every draw, each exactly once

    # only rank 0 writes: one CSV log, the artifact written once
    assert [p.relative_to(run).as_posix() for p in run.rglob("metrics.csv")] == [
        "specialist-synthetic_swap/version_0/metrics.csv"
    ]
    assert "written to" in main_log.read_text() and "written to" not in child_log.read_text()

    # the logged validation loss is the mean over the whole split (both ranks' shards), not rank 0's half
    rows = list(csv.DictReader((run / "specialist-synthetic_swap/version_0/metrics.csv").open()))
    logged = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    val = instantiate(cfg.data).frames("val")
    assert len(val) % 2 == 0  # equal shards, no padding: the synced mean is the whole split's mean
    from r2m_lab.data.loaders import FrameDataset, build_transform, eval_loader
    from r2m_lab.detector import score_frames
    from r2m_lab.stages.models import load_detector, model_input_config

    model = load_detector(cfg, Checkpoint(specialist_path(cfg, "synthetic_swap")))
    loader = eval_loader(FrameDataset(val, build_transform(model_input_config(cfg, model))), 64)
    p_fake = score_frames(model, loader)
    nll = -np.log(np.where(val.labels == 1, p_fake, 1 - p_fake))
    assert logged == pytest.approx([nll.mean()], rel=1e-4)
    assert nll[0::2].mean() != pytest.approx(nll.mean(), rel=1e-4)  # rank 0's shard alone would differ


@pytest.mark.slow
def test_a_gpu_preset_without_a_gpu_names_the_cpu_preset(tmp_path):
    proc = run_cli("stage=finetune", "debug=smoke", "trainer=gpu", root=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "trainer=gpu asks for a GPU" in proc.stderr and "trainer=cpu" in proc.stderr
    assert "MisconfigurationException" not in proc.stderr
    assert not (tmp_path / "artifacts").exists()  # refused before θ₀'s pretext trains


@pytest.mark.parametrize("preset", ["gpu", "ddp"], ids=lambda p: f"trainer={p}")  # an id "gpu" would skip it
def test_gpu_presets_are_refused_before_training(make_cfg, monkeypatch, preset):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = make_cfg(f"trainer={preset}")
    with pytest.raises(RuntimeError, match="asks for a GPU.*trainer=cpu"):
        train_detector(cfg, cfg.data, kind="specialist", reuse=False)
    assert not base_path(cfg).exists()  # θ₀'s pretext did not start
    with pytest.raises(InstantiationException, match=r"accelerator=gpu.*trainer.accelerator=cpu trainer.devices=2"):
        instantiate(cfg.trainer)  # θ₀ present or not: the trainer is refused where it is built


def test_ddp_on_one_device_runs_as_one_process_with_a_notice(make_cfg, caplog):
    cfg = make_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1")
    with caplog.at_level(logging.WARNING, logger="r2m_lab.stages.devices"):
        trainer = instantiate(cfg.trainer)
    assert trainer.world_size == 1 and type(trainer.strategy).__name__ == "SingleDeviceStrategy"
    assert "with one device" in caplog.text and "single process" in caplog.text


def test_ddp_uses_every_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert devices.device_count("gpu", -1) == 8
    assert devices.device_count("gpu", "0,1") == 2 and devices.device_count("cpu", 2) == 2
    cfg = compose_config(Path("/nonexistent"), ["trainer=ddp"])
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (-1, 1, "ddp")
    assert (cfg.trainer.precision, cfg.trainer.fused_optimizer, cfg.trainer.pin_memory) == ("bf16-mixed", True, True)


def test_other_stages_refuse_several_processes(make_cfg):
    cfg = make_cfg("stage=merge", *CPU_DDP)
    ensure_base(cfg)
    with pytest.raises(RuntimeError, match="stage=finetune supports.*stage=merge"):
        train_detector(cfg, cfg.data, kind="specialist", reuse=False)
    assert not specialist_path(cfg, "synthetic_swap").exists()


def test_the_gpu_switches_apply_and_keep_the_weight_names(make_cfg):
    # torch.compile with the eager backend: Dynamo traces the backbone without a C compiler (inductor on CPU takes
    # minutes here); channels-last and the fused optimizer run on CPU as they do on a GPU.
    cfg = make_cfg(
        "trainer=cpu",
        "trainer.compile=true",
        "trainer.compile_options.backend=eager",
        "trainer.channels_last=true",
        "trainer.fused_optimizer=true",
    )
    card = train_detector(cfg, cfg.data, kind="specialist", reuse=False)
    dist = card["distributed"]
    assert dist["compile"] and dist["channels_last"] and dist["fused_optimizer"]
    assert dist["compile_options"]["backend"] == "eager" and dist["world_size"] == 1
    from r2m_lab.stages.models import load_detector

    model = load_detector(cfg, Checkpoint(specialist_path(cfg, "synthetic_swap")), with_optimizer=True)  # strict
    speedups = devices.Speedups(
        compile=True, compile_options={"backend": "eager"}, channels_last=True, fused_optimizer=True
    )
    speedups.setup(None, model, "fit")
    assert model.backbone._compiled_call_impl is not None
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.configure_optimizers().defaults["fused"] is True


def test_a_fused_optimizer_the_recipe_cannot_fuse_is_refused(make_cfg):
    from r2m_lab.stages.models import load_detector

    cfg = make_cfg("backbone.recipe.optimizer._target_=torch.optim.RMSprop")
    model = load_detector(cfg, Checkpoint(ensure_base(cfg)), with_optimizer=True)
    model.optimizer_options = {"fused": True}
    with pytest.raises(TypeError, match="RMSprop takes no fused argument.*trainer.fused_optimizer=false"):
        model.configure_optimizers()


def test_a_rank_other_than_0_waits_for_theta0(make_cfg, monkeypatch, tmp_path):
    cfg = make_cfg()
    monkeypatch.setenv("RANK", "1")
    assert not devices.launch_rank_is_zero()
    monkeypatch.setattr("r2m_lab.stages.base_model.wait_for_file", lambda p, what: devices.wait_for_file(p, what, 0.1))
    with pytest.raises(TimeoutError, match="not rank 0"):
        ensure_base(cfg)
    assert not base_path(cfg).exists()  # rank 1 created nothing
    monkeypatch.setenv("RANK", "0")
    assert devices.launch_rank_is_zero() and ensure_base(cfg) == base_path(cfg)
