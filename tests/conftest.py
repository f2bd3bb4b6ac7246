"""Shared test fixtures: offline environment, single-threaded torch, composed configs redirected to tmp folders."""

from __future__ import annotations

import os

# Before anything imports wandb, albumentations or huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["WANDB_MODE"] = "disabled"

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

# Tiny tensors on 2 cores: one thread is several times faster than two fighting over them.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

Compose = Callable[..., DictConfig]


def compose_config(root: Path, overrides: list[str] = (), smoke: bool = True) -> DictConfig:
    """The real config, composed as the CLI would, with every path inside ``root``."""
    base = [f"paths.root={root}", f"paths.output_dir={root}/run"]
    if smoke:
        base.append("debug=smoke")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*base, *overrides])


# The longest tests (minutes each on 2 cores), in the order they should start.
LONGEST_FIRST = ("tests/test_paper_sweeps.py", "tests/test_cli.py", "tests/test_cluster.py")


def _start_order(item: pytest.Item) -> tuple[int, int]:
    path = item.nodeid.split("::")[0]
    heavy = LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)
    return (0 if "slow" in item.keywords else 1, heavy)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first, the longest of them first: ``make test`` spreads tests over the cores (pytest-xdist), and a
    long test handed out last would run alone at the end. Tests marked ``gpu`` run only where CUDA is available
    (they are skipped, and say why, elsewhere)."""
    items.sort(key=_start_order)  # stable: the file order within each class
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Compose:
    def _make(*overrides: str, root: Path | None = None, smoke: bool = True) -> DictConfig:
        return compose_config(root or tmp_path, list(overrides), smoke)

    return _make


@pytest.fixture(scope="session")
def trained_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root whose artifacts hold θ₀, every smoke specialist and the joint model (trained once per session)."""
    from r2m_lab.stages.finetune import train_detector

    root = tmp_path_factory.mktemp("trained")
    cfg = compose_config(root)
    for data_cfg in cfg.benchmark.specialists.values():
        train_detector(cfg, data_cfg, kind="specialist", reuse=False)
    train_detector(cfg, cfg.benchmark.joint, kind="joint", reuse=False)
    return root
