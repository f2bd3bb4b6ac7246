"""Training-throughput benchmark (``make bench-train``): images/s of the model alone and of the full data pipeline.

Not a test: it writes ``<out>/train_report.{md,json}`` and prints the Markdown table. For each backbone (its
``conf/backbone/<name>.yaml``: architecture, input size, normalisation, the recipe's optimizer and augmentations;
random weights, no download) three measurements on one device, each after a few warm-up steps:

- **model alone**: one training step (forward, cross-entropy, backward, the recipe's optimizer step) on synthetic
  tensors already on the device, so nothing waits for data;
- **data alone**: the project's own loader (``DetectionDataModule`` → ``FrameDataset`` → ``build_transform``:
  PNG decode, the recipe's augmentations, resize, normalise) over PNG crops on disk, batches moved to the device and
  dropped;
- **full pipeline**: the same loader feeding the same training step.

The pipeline's ratio to the model alone says how much of the model's speed a real run keeps, and comparing the data
side alone with the model alone says which side is the bottleneck (measured, not guessed). The PNG crops (256 px by
default, as DeepfakeBench's face crops) are written once under ``<out>/fixtures`` and read from the page cache after
the first pass; their content is smooth colour fields plus sensor-like noise, so they compress about as well as face
crops do (the report gives the mean file size). Timings depend on the machine; the report records it.

    python -m r2m_lab.bench_train               # tiny on CPU; tiny, CLIP ViT-B/16 and ViT-L/14 when CUDA is there
    python -m r2m_lab.bench_train --backbone clip_vit_l14 --workers 12 --steps 50
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CPU_BACKBONES = ("tiny",)
GPU_BACKBONES = ("tiny", "clip_vit_b16", "clip_vit_l14")  # at 224 px (their configs' input size), bf16, batch 32
NOT_RUN_WITHOUT_GPU = ("clip_vit_b16", "clip_vit_l14")
# Issue 11's target: the full pipeline keeps at least 80 % of the model-alone throughput for ViT-L/14 on one H100/H200.
PIPELINE_TARGETS = {("clip_vit_l14", "cuda"): 0.8}
FIXTURE_VERSION = 1  # bump when the crops' recipe changes, so cached files are rebuilt
FRAMES_PER_VIDEO = 8

log = logging.getLogger("r2m_lab.bench_train")


# ------------------------------------------------------------------------------------------------------- fixtures
def _crop(rng: Any, size: int) -> Any:
    """One (size, size, 3) uint8 image: a smooth colour field (8×8 random colours, bicubic) plus noise of σ 6."""
    import cv2
    import numpy as np

    field = cv2.resize(rng.uniform(30, 225, (8, 8, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)


def build_frames(root: Path, n: int, size: int) -> Path:
    """``n`` PNG crops of ``size`` px under ``root`` (reused when complete; written to a temp folder, then renamed,
    so an interrupted write is never reused); returns their folder."""
    import cv2
    import numpy as np

    folder = root / f"frames-v{FIXTURE_VERSION}-{size}px-{n}"
    if folder.is_dir():
        return folder
    tmp = root / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    log.info("Writing %d PNG crops of %d px to %s", n, size, folder)
    for i in range(n):
        if not cv2.imwrite(str(tmp / f"{i:06d}.png"), _crop(rng, size)):
            raise OSError(f"cannot write {tmp / f'{i:06d}.png'}")
    os.replace(tmp, folder)
    return folder


def frame_set(folder: Path) -> Any:
    """The crops as an on-disk FrameSet: videos of 8 frames, every other video fake."""
    import numpy as np

    from r2m_lab.data.sources import FrameSet

    paths = sorted(str(p) for p in folder.glob("*.png"))
    videos = np.arange(len(paths)) // FRAMES_PER_VIDEO
    labels = (videos % 2).astype(np.int64)
    return FrameSet("bench_frames", labels, np.asarray([f"bench/{v}" for v in videos]), paths=paths)


# ------------------------------------------------------------------------------------------------------- one backbone
def backbone_config(name: str, overrides: Sequence[str] = ()) -> Any:
    """The project's config with ``backbone=<name>`` (composed as the CLI composes it)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"backbone={name}", *overrides])


def _autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _step(model: Any, optimizer: Any, x: Any, y: Any, device: str, precision: str) -> None:
    """One training step as Detector.training_step + Lightning's optimisation do it (logging aside)."""
    import torch

    with _autocast(device, precision):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _timed(batches: Iterator[Any], warmup: int, steps: int, device: str, work: Any) -> float:
    """Images/s of ``work(batch)`` over ``steps`` batches after ``warmup`` untimed ones (device synchronised)."""
    for _ in range(warmup):
        work(next(batches))
    _sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += work(next(batches))
    _sync(device)
    return images / (time.perf_counter() - start)


def run_backbone(name: str, frames: Any, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The three measurements for one backbone; returns its report row."""
    import torch
    from hydra.utils import instantiate

    from r2m_lab.backbones import create_backbone, input_config
    from r2m_lab.data.loaders import DetectionDataModule, build_augment, build_transform
    from r2m_lab.detector import Detector
    from r2m_lab.stages.config_nodes import plain

    cfg = backbone_config(name)
    recipe = cfg.backbone.recipe
    precision = args.precision if args.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    workers = int(recipe.num_workers) if args.workers is None else args.workers
    torch.manual_seed(0)
    backbone = create_backbone(plain(cfg.backbone), load_weights=False)  # random weights: no file, no download
    model = Detector(backbone, torch.nn.Linear(backbone.num_features, 2), instantiate(recipe.optimizer))
    model = model.to(device).train()
    optimizer = model.configure_optimizers()
    inputs = input_config(plain(cfg.backbone), backbone)
    size, batch = inputs["input_size"], args.batch_size

    def train_on(batch_xy: tuple[Any, ...]) -> int:
        x, y = batch_xy[0].to(device, non_blocking=True), batch_xy[1].to(device, non_blocking=True)
        _step(model, optimizer, x, y, device, precision)
        return len(y)

    def load_only(batch_xy: tuple[Any, ...]) -> int:
        batch_xy[0].to(device, non_blocking=True)
        return len(batch_xy[1])

    def loader() -> Any:
        # the project's training loader, exactly as stage=finetune builds it (sampler, workers, transforms)
        module = DetectionDataModule(
            frames,
            frames,
            build_transform(inputs, build_augment(recipe.augment), seed=0),
            build_transform(inputs),
            batch_size=batch,
            num_samples=(args.warmup + args.steps) * batch,
            balanced=bool(recipe.balanced),
            num_workers=workers,
            seed=0,
        )
        return module.train_dataloader()

    log.info(
        "%s on %s (%s, batch %d, %d px, %d workers): model alone ...", name, device, precision, batch, size, workers
    )
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    model_ips = _timed(iter(lambda: (x, y), None), args.warmup, args.steps, device, train_on)
    log.info("  model alone %.1f images/s; data alone ...", model_ips)
    data_loader = loader()
    data_ips = _timed(iter(data_loader), args.warmup, args.steps, device, load_only)
    log.info("  data alone %.1f images/s; full pipeline ...", data_ips)
    pipeline_loader = loader()
    pipeline_ips = _timed(iter(pipeline_loader), args.warmup, args.steps, device, train_on)
    log.info("  full pipeline %.1f images/s", pipeline_ips)
    row = {
        "backbone": name,
        "model": str(cfg.backbone.model),
        "device": device,
        "precision": precision,
        "batch_size": batch,
        "input_size": size,
        "optimizer": type(optimizer).__name__,
        "augment": [k for k, v in (recipe.augment or {}).items() if v is not None],
        "num_workers": workers,
        "pin_memory": bool(pipeline_loader.pin_memory),
        "persistent_workers": bool(pipeline_loader.persistent_workers),
        "steps": args.steps,
        "warmup": args.warmup,
        "model_images_per_s": model_ips,
        "data_images_per_s": data_ips,
        "pipeline_images_per_s": pipeline_ips,
        "pipeline_over_model": pipeline_ips / model_ips,
        "bottleneck": "data loading" if data_ips < model_ips else "model",
    }
    if device.startswith("cuda"):
        row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return row


# ------------------------------------------------------------------------------------------------------- report
def _verdict(row: dict[str, Any]) -> str:
    target = PIPELINE_TARGETS.get((row["backbone"], row["device"].split(":")[0]))
    if target is None:
        return ""
    ok = "yes" if row["pipeline_over_model"] >= target else "NO"
    return f"pipeline ≥ {target:.0%} of model alone: {ok}"


def markdown(rows: list[dict[str, Any]], not_run: list[dict[str, str]], machine: dict[str, Any]) -> str:
    lines = [
        "# Training-throughput benchmark",
        "",
        f"Machine: {machine['cpus']} CPU cores, {machine['platform']}, torch {machine['torch']}, device "
        f"{machine['device']}. Images/s after warm-up; one step = forward, cross-entropy, backward, optimizer step. "
        f"Data: {machine['frames']['count']} PNG crops of {machine['frames']['size']} px "
        f"({machine['frames']['mean_kb']:.0f} kB each on average, page-cached after the first pass).",
        "",
        "| backbone | device | precision | batch | px | workers | model alone img/s | data alone img/s | "
        "full pipeline img/s | pipeline / model | bottleneck | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['device']} | {r['precision']} | {r['batch_size']} | {r['input_size']} | "
            f"{r['num_workers']} | {r['model_images_per_s']:.1f} | {r['data_images_per_s']:.1f} | "
            f"{r['pipeline_images_per_s']:.1f} | {r['pipeline_over_model']:.2f} | {r['bottleneck']} | {_verdict(r)} |"
        )
    for r in not_run:
        lines.append(f"| {r['backbone']} | — | | | | | | | | | | not run: {r['reason']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r2m_lab.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbone", nargs="+", default=None, help="conf/backbone names; default: tiny, + CLIP B/16 and L/14 on CUDA"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda | cuda:1 ...")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers; default: the recipe's")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of the main process; default: torch's (all cores)"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    parser.add_argument("--frames", type=int, default=512, help="PNG crops on disk (sampled with replacement)")
    parser.add_argument("--crop", type=int, default=256, help="their size in px (resized to the backbone's input)")
    parser.add_argument("--out", type=Path, default=REPO / "bench", help="report and cached crops")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.frames) < 1 or args.warmup < 0:
        parser.error("--steps, --batch-size and --frames must be ≥ 1, --warmup ≥ 0")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from r2m_lab.atomic import write_json_atomic, write_text_atomic

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # on a shared machine, threads that wait for busy cores cost more than 1
    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not cuda:
        parser.error(f"--device {device}: torch sees no CUDA device; use --device cpu")
    names = args.backbone or list(GPU_BACKBONES if device.startswith("cuda") else CPU_BACKBONES)
    not_run = []
    if not device.startswith("cuda") and args.backbone is None:
        reason = "no CUDA device" if not cuda else f"--device {device}"
        not_run = [{"backbone": b, "reason": reason} for b in NOT_RUN_WITHOUT_GPU]
        log.info("GPU rows (%s) not run: %s", ", ".join(NOT_RUN_WITHOUT_GPU), reason)
    folder = build_frames(args.out / "fixtures", args.frames, args.crop)
    frames = frame_set(folder)
    sizes = [os.path.getsize(p) for p in frames.paths]
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch_threads": torch.get_num_threads(),
        "frames": {
            "folder": str(folder),
            "count": len(sizes),
            "size": args.crop,
            "mean_kb": sum(sizes) / len(sizes) / 1e3,
        },
    }
    rows: list[dict[str, Any]] = []
    text = markdown(rows, not_run, machine)
    for name in names:
        rows.append(run_backbone(name, frames, args, device))
        if device.startswith("cuda"):  # the last backbone's model, optimizer and loaders are gone with its frame
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        # rewritten after every backbone: an interrupted benchmark keeps what it measured
        text = markdown(rows, not_run, machine)
        write_text_atomic(args.out / "train_report.md", text)
        write_json_atomic(args.out / "train_report.json", {"machine": machine, "rows": rows, "not_run": not_run})
    sys.stdout.write(text)
    for r in not_run:
        sys.stdout.write(f"{r['backbone']}: not run ({r['reason']}); run make bench-train on a machine with a GPU\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
