"""Nothing is replaced or ignored silently: recipe-tagged artifact paths, refused replacements, the W&B mode rule,
what a merge trains when it lacks something, and a checkpoint that does not fit named with its recipe."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from r2m_lab.stages import run_stage
from r2m_lab.stages.artifacts import base_path, merged_path, recipe_tag, specialist_path
from r2m_lab.weights import Checkpoint
from tests.conftest import compose_config


def copy_artifacts(trained_root: Path, root: Path) -> Path:
    shutil.copytree(trained_root / "artifacts", root / "artifacts", ignore=shutil.ignore_patterns("merged"))
    return root


# ------------------------------------------------------------------------------------------- paths
def test_smoke_and_real_runs_never_share_an_artifact_path(tmp_path):
    smoke, real = compose_config(tmp_path), compose_config(tmp_path, smoke=False)
    assert base_path(smoke) != base_path(real)
    assert specialist_path(smoke, "synthetic_swap") != specialist_path(real, "synthetic_swap")
    assert merged_path(smoke, smoke.merger) != merged_path(real, real.merger)
    # a recipe knob alone (same architecture, same θ₀) moves the specialists too; the same config keeps its paths
    longer = compose_config(tmp_path, ["backbone.recipe.max_steps=4"])
    assert base_path(longer) == base_path(smoke)
    assert specialist_path(longer, "synthetic_swap") != specialist_path(smoke, "synthetic_swap")
    assert specialist_path(compose_config(tmp_path), "synthetic_swap") == specialist_path(smoke, "synthetic_swap")
    # readable: <backbone>-<tag>/seed<seed>/<data>
    path = specialist_path(smoke, "synthetic_swap").relative_to(tmp_path / "artifacts")
    assert path.parts == ("specialists", recipe_tag(smoke), "seed0", "synthetic_swap.safetensors")
    assert recipe_tag(smoke).startswith("tiny-") and recipe_tag(smoke) != recipe_tag(real)


def test_a_smoke_checkpoint_in_the_real_backbone_is_one_clear_error(trained_root):
    from r2m_lab.stages.models import load_detector

    smoke = compose_config(trained_root)
    path = specialist_path(smoke, "synthetic_swap")
    with pytest.raises(ValueError) as err:
        load_detector(compose_config(trained_root, smoke=False), Checkpoint(path))
    message = str(err.value)
    assert len(message.splitlines()) <= 3, message  # torch's own message is one line per mismatched tensor
    assert str(path) in message and recipe_tag(smoke) in message and "debug=smoke" in message
    assert "other shapes" in message and "embed_dim" in message


# ------------------------------------------------------------------------------------------- replacements
def test_a_different_specialist_is_refused_then_replaced_on_request_and_recorded(trained_root, tmp_path):
    root = copy_artifacts(trained_root, tmp_path)
    cfg = compose_config(root, ["stage=finetune", "data=synthetic_swap"])
    path = specialist_path(cfg, "synthetic_swap")
    before = path.read_bytes()
    old_fp = Checkpoint(path).card()["fingerprint"]

    # the same config in a copied tree: same fingerprint (paths under paths.root are relative), reused, not rewritten
    card = run_stage(cfg)
    assert card["fingerprint"] == old_fp and path.read_bytes() == before

    changed = ["stage=finetune", "data=synthetic_swap", "data.families=[swap,edit]"]  # same name and path, other data
    with pytest.raises(FileExistsError) as err:
        run_stage(compose_config(root, changed))
    message = str(err.value)
    assert str(path) in message and "overwrite=true" in message
    assert "data.families: ['swap'] → ['swap', 'edit']" in message
    assert path.read_bytes() == before, "a refusal leaves the file alone"

    card = run_stage(compose_config(root, [*changed, "overwrite=true"]))
    assert path.read_bytes() != before
    assert card["replaced"]["fingerprint"] == old_fp and card["fingerprint"] != old_fp
    assert any("data.families" in d for d in card["replaced"]["differences"])
    assert Checkpoint(path).card()["replaced"] == card["replaced"]
    assert (path.parents[1] / "recipe.json").is_file()


# ------------------------------------------------------------------------------------------- train what is missing
def test_a_smoke_merge_trains_only_what_it_lacks(trained_root, tmp_path):
    root = copy_artifacts(trained_root, tmp_path)
    cfg = compose_config(root, ["stage=evaluate", "stage.model=joint"])
    kept = specialist_path(cfg, "synthetic_swap")
    stamp = kept.stat().st_mtime_ns
    for name in ("synthetic_edit", "synthetic_joint"):
        specialist_path(cfg, name).unlink()
    base_path(cfg).unlink()

    with pytest.raises(FileNotFoundError) as err:
        run_stage(compose_config(root, ["stage=merge", "train_missing=false"]))
    assert "stage=finetune data=synthetic_edit" in str(err.value) and "synthetic_joint" not in str(err.value)
    assert "train_missing=true" in str(err.value)

    with pytest.raises(FileNotFoundError) as err:
        run_stage(compose_config(root, ["stage=evaluate", "stage.model=joint", "train_missing=false"]))
    assert "stage=finetune data=synthetic_joint" in str(err.value) and "synthetic_edit" not in str(err.value)

    run_stage(cfg)  # debug=smoke sets train_missing=true: the joint row trains θ₀ and the joint model only
    assert specialist_path(cfg, "synthetic_joint").is_file() and base_path(cfg).is_file()
    assert not specialist_path(cfg, "synthetic_edit").is_file()
    card = run_stage(compose_config(root, ["stage=merge", "merger=average"]))
    assert card["merger"] == "average" and specialist_path(cfg, "synthetic_edit").is_file()
    assert kept.stat().st_mtime_ns == stamp, "what exists is not retrained"


def test_theta0_alone_missing_is_recreated_or_named(trained_root, tmp_path):
    root = copy_artifacts(trained_root, tmp_path)
    cfg = compose_config(root, ["stage=merge", "merger=average", "train_missing=false"])
    base = Checkpoint(base_path(cfg)).base_hash
    base_path(cfg).unlink()
    with pytest.raises(FileNotFoundError, match="θ₀ for backbone tiny"):
        run_stage(cfg)
    run_stage(compose_config(root, ["stage=merge", "merger=average"]))  # train_missing (smoke): θ₀ is rebuilt
    assert Checkpoint(base_path(cfg)).base_hash == base, "the same recipe rebuilds the same θ₀"


# ------------------------------------------------------------------------------------------- W&B mode
@pytest.mark.parametrize(
    ("offline", "env", "mode", "warns"),
    [
        (True, None, "offline", False),
        (False, None, "online", False),
        (False, "offline", "offline", True),  # the Makefile used to export this: logger.offline=false had no effect
        (False, "dryrun", "offline", True),
        (True, "disabled", "disabled", True),  # tests and CI: no run is written, and that is said
        (True, "online", "online", True),
        (True, "offline", "offline", False),
    ],
)
def test_wandb_mode_follows_the_environment_and_says_when_it_overrides(offline, env, mode, warns):
    from r2m_lab.stages.loggers import wandb_mode

    got, warning = wandb_mode(offline, env)
    assert got == mode and bool(warning) == warns
    if warns:
        assert f"logger.offline={str(offline).lower()}" in warning and f"WANDB_MODE={env}" in warning


def test_wandb_mode_refuses_an_unknown_value():
    from r2m_lab.stages.loggers import wandb_mode

    with pytest.raises(ValueError, match="WANDB_MODE='offlne'"):
        wandb_mode(True, "offlne")


def test_build_logger_applies_the_decided_mode_and_records_it(make_cfg, monkeypatch, caplog):
    import r2m_lab.stages.loggers as loggers

    monkeypatch.setattr(loggers, "_USER_WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # what WandbLogger(offline=True) leaves behind in this process
    cfg = make_cfg("logger=wandb", "logger.offline=false")
    with caplog.at_level(logging.WARNING, logger="r2m_lab.stages.loggers"):
        logger = loggers.build_logger(cfg, name="t")
    try:
        assert logger.r2m_wandb_mode == "disabled" and os.environ["WANDB_MODE"] == "disabled"
        assert logger.experiment.settings.mode == "disabled"
        assert any("WANDB_MODE=disabled" in r.getMessage() for r in caplog.records)
    finally:
        loggers.close_logger(logger)
