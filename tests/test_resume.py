"""Resumable fine-tuning: a fine-tune killed by a real signal and resumed ends with the weights of an uninterrupted one;
a non-finite loss stops with the step, the frames and the last good checkpoint; resume refusals train nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from r2m_lab.data.loaders import DrawSampler, FrameDataset, ResumableLoader, balanced_sampler, build_transform
from r2m_lab.data.sources import FrameSet
from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import base_path, specialist_path
from r2m_lab.stages.base_model import ensure_base
from r2m_lab.training_state import AtomicCheckpointIO, NonFiniteLoss, checkpoint_path, read_checkpoint
from r2m_lab.weights import Checkpoint
from tests.conftest import REPO, compose_config

# Enough steps that a kill lands mid-run (the smoke backbone: ~0.1 s a step here). Stochastic depth makes training
# draw from torch's global RNG, so the resumed run also needs the RNG state the checkpoint restores.
STEPS = [
    "stage=finetune",
    "debug=smoke",
    "backbone.recipe.max_steps=30",
    "checkpoint.every_minutes=null",
    "+backbone.kwargs.drop_path_rate=0.2",
]


def cli(root: Path, *args: str) -> subprocess.Popen:
    """The real CLI in a subprocess, its output in ``root/cli.log`` (a file: a full pipe would stall it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open(root / "cli.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "r2m_lab", *args, f"paths.root={root}", f"paths.output_dir={root}/run"],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.slow
def test_killed_finetune_resumes_to_the_uninterrupted_weights(tmp_path):
    every = ["checkpoint.every_n_steps=3"]
    cfg = compose_config(tmp_path, [STEPS[0], *STEPS[2:], *every, "resume=true"])
    final = specialist_path(cfg, cfg.data.name)
    ckpt = checkpoint_path(final)
    ensure_base(cfg)  # θ₀ first (in this process), so that the killed run spends its time fine-tuning
    proc = cli(tmp_path, *STEPS, *every)
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = (tmp_path / "cli.log").read_text()
    assert proc.returncode == -signal.SIGKILL, f"the fine-tune ended before the kill (it needs more steps):\n{out}"
    assert not final.exists()
    killed_at = int(read_checkpoint(ckpt)["global_step"])
    assert 0 < killed_at < 30

    # Resumed (in this process: the kill is what has to be real, and a second interpreter start costs ~10 s here)
    card = run_stage(cfg)
    assert card["resumed_at_step"] == killed_at
    assert not ckpt.exists(), "the training checkpoint is deleted once the detector is written"
    resumed = Checkpoint(final)
    weights = {**resumed.backbone, **{f"head.{k}": v for k, v in resumed.head.items()}}

    # The same config, uninterrupted and without checkpoints (so checkpointing itself is shown not to perturb it)
    fresh_card = run_stage(
        compose_config(
            tmp_path, [STEPS[0], *STEPS[2:], "checkpoint.every_n_steps=null"] + ["resume=false", "overwrite=true"]
        )
    )
    assert fresh_card["resumed_at_step"] is None and fresh_card["fingerprint"] == card["fingerprint"]
    fresh = Checkpoint(final)
    reference = {**fresh.backbone, **{f"head.{k}": v for k, v in fresh.head.items()}}
    assert weights.keys() == reference.keys()
    different = [k for k in weights if not torch.equal(weights[k], reference[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's in {different[:5]}"
    assert not torch.equal(weights["head.weight"], Checkpoint(base_path(cfg)).head["weight"])


def test_nonfinite_loss_stops_with_step_frames_and_last_good_checkpoint(tmp_path):
    # An absurd learning rate: the first step is finite and checkpointed, the weights it leaves overflow the next loss.
    cfg = compose_config(
        tmp_path,
        ["stage=finetune", "backbone.recipe.max_steps=6", "checkpoint.every_minutes=null"]
        + ["checkpoint.every_n_steps=1", "backbone.recipe.optimizer.lr=1e30"],
    )
    with pytest.raises(NonFiniteLoss) as err:
        run_stage(cfg)
    final = specialist_path(cfg, cfg.data.name)
    ckpt = read_checkpoint(checkpoint_path(final))
    message = str(err.value)
    step = int(ckpt["global_step"])
    assert step >= 1, "the first steps were finite and checkpointed"
    assert f"Training stopped at step {step + 1}: the training loss is nan on a batch of 16 frames of " in message
    assert f"{cfg.data.name} (train), first: synthetic/train/" in message
    assert f"(step {step}) is kept at {checkpoint_path(final)}" in message
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    assert not final.exists(), "a run stopped on a non-finite loss writes no detector"


def test_resume_true_without_checkpoint_trains_nothing(tmp_path):
    cfg = compose_config(tmp_path, ["stage=finetune", "resume=true"])
    with pytest.raises(FileNotFoundError, match="no training checkpoint at .*synthetic_swap.ckpt"):
        run_stage(cfg)
    assert not base_path(cfg).exists(), "not even θ₀ is built"
    assert not specialist_path(cfg, cfg.data.name).exists()


def test_checkpoint_of_another_config_is_refused_and_a_truncated_one_never_read(tmp_path):
    ckpt_cfg = ["stage=finetune", "checkpoint.every_minutes=null", "checkpoint.every_n_steps=1"]
    # A run stopped on a non-finite loss leaves a checkpoint of its config (a huge lr) behind.
    with pytest.raises(NonFiniteLoss):
        run_stage(
            compose_config(tmp_path, [*ckpt_cfg, "backbone.recipe.max_steps=6", "backbone.recipe.optimizer.lr=1e30"])
        )
    # The same data, seed and tag folder with another data config behind the name: same path, another fingerprint.
    other = [
        *ckpt_cfg,
        "backbone.recipe.max_steps=6",
        "backbone.recipe.optimizer.lr=1e30",
        "data.cache_dir=${paths.root}/cache2",
    ]
    cfg = compose_config(tmp_path, [*other, "resume=true"])
    path = checkpoint_path(specialist_path(cfg, cfg.data.name))
    assert path.is_file()
    before = path.read_bytes()
    with pytest.raises(ValueError, match="comes from another config") as err:
        run_stage(cfg)
    assert "data.cache_dir" in str(err.value)
    assert path.read_bytes() == before, "the refused checkpoint is left as it was"

    # Truncated under its real name (a copy cut short): refused, whatever resume says, and never handed to Lightning.
    path.write_bytes(before[: len(before) // 2])
    for mode in ("true", "auto"):
        with pytest.raises(ValueError, match="cannot be read"):
            run_stage(compose_config(tmp_path, [*other, f"resume={mode}"]))
    assert not specialist_path(cfg, cfg.data.name).exists()


def test_draws_are_a_function_of_seed_and_epoch():
    labels = np.array([0] * 30 + [1] * 10)
    a, b = balanced_sampler(labels, 200, seed=4), balanced_sampler(labels, 200, seed=4)
    first = list(a)
    assert first == list(b) and first != list(a), "the next pass is the next epoch"
    b.set_epoch(0)
    assert list(b) == first
    seeds = [s for s, _ in first]
    assert len(set(seeds)) > 190, "each draw has its own augmentation seed"
    # epoch 0's frame order is torch's WeightedRandomSampler's with this seed (what training drew before draws)
    weights = torch.as_tensor(np.where(labels == 1, 0.5 / 10, 0.5 / 30))
    gen = torch.Generator().manual_seed(4)
    assert [f for _, f in first] == list(torch.utils.data.WeightedRandomSampler(weights, 200, True, generator=gen))


def test_loader_state_skips_to_the_batch_after_the_saved_one_and_workers_do_not_change_batches():
    import albumentations as A

    image = np.tile(np.arange(8, dtype=np.uint8)[None, :, None], (8, 1, 3))
    frames = FrameSet(
        "x", np.array([0, 1] * 8), np.array([f"v{i}" for i in range(16)]), images=image[None].repeat(16, 0)
    )
    inputs = {"input_size": 8, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}

    def loader(workers: int) -> ResumableLoader:
        dataset = FrameDataset(frames, build_transform(inputs, [A.HorizontalFlip(p=0.5)], seed=3))
        return ResumableLoader(dataset, batch_size=4, sampler=DrawSampler(None, 16, 24, seed=1), num_workers=workers)

    whole = loader(0)
    batches = list(whole)
    flips = torch.cat([x[:, 0, 0, 0] > x[:, 0, 0, -1] for x, _, _ in batches])
    assert 0 < flips.float().mean() < 1, "augmentations are drawn"
    # Worker processes load the same batches (each draw carries its augmentation seed).
    for got, want in zip(loader(2), batches, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])

    # Stopped after 2 batches of epoch 0: the state says so, and a new loader starts at the third.
    part = loader(0)
    it = iter(part)
    next(it), next(it)
    state = part.state_dict()
    assert state == {"epoch": 0, "batches": 2}
    resumed = loader(0)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(batches) - 2
    for got, want in zip(rest, batches[2:], strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert len(list(resumed)) == len(batches), "the skip applies to one pass only"


def test_a_checkpoint_write_cut_short_leaves_the_previous_checkpoint_whole(tmp_path):
    class CutShort:  # pickling fails after the tensor before it was written: a write that dies midway
        def __reduce__(self):
            raise RuntimeError("write cut short")

    path = tmp_path / "synthetic_swap.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="cut short"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10_000), "later": CutShort()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temp file is left beside it"


class _Draws(torch.utils.data.Dataset):
    """A dataset that returns the (augmentation seed, frame) draw it is indexed with."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, draw: tuple[int, int]) -> torch.Tensor:
        return torch.tensor(draw)


@pytest.mark.parametrize("forwards", [True, False], ids=["lightning>=2.6", "older wrapper"])
def test_a_resumed_ddp_rank_draws_the_epoch_lightning_restored(forwards, monkeypatch):
    # Under DDP Lightning wraps the sampler in a DistributedSamplerWrapper and calls set_epoch on the wrapper before
    # each epoch (its restored epoch after a resume). Releases before 2.6 do not forward it to the sampler inside:
    # the loader must, or a resumed rank would draw epoch 0's frames again in epoch 1.
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from torch.utils.data import DistributedSampler

    if not forwards:
        monkeypatch.setattr(DistributedSamplerWrapper, "set_epoch", DistributedSampler.set_epoch)

    def rank0_loader() -> tuple[ResumableLoader, DistributedSamplerWrapper]:
        wrapper = DistributedSamplerWrapper(DrawSampler(None, 16, 24, seed=1), num_replicas=2, rank=0, shuffle=False)
        return ResumableLoader(_Draws(), batch_size=4, sampler=wrapper), wrapper

    run, wrapper = rank0_loader()
    epochs = []
    for epoch in range(2):
        wrapper.set_epoch(epoch)
        epochs.append(torch.cat(list(run)))
    assert not torch.equal(epochs[0], epochs[1])

    # killed after the first batch of epoch 1: a fresh process restores the loader, then Lightning sets epoch 1
    resumed, wrapper = rank0_loader()
    resumed.load_state_dict({"epoch": None, "batches": 1})
    wrapper.set_epoch(1)
    assert torch.equal(torch.cat(list(resumed)), epochs[1][4:])
