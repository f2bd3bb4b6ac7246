"""How W&B files a run: one group per sweep (its name and launch time), job type = stage, name = overrides."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from r2m_lab.stages.loggers import run_identity, sweep_group
from tests.conftest import CONF


@pytest.fixture(autouse=True)
def _forget_hydra():
    """HydraConfig is a process-wide singleton: leave it as the next test expects it (not initialised)."""
    yield
    HydraConfig.instance().cfg = None


def _hydra(tmp_path, overrides, mode, config_name="config"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"paths.root={tmp_path}", "debug=smoke", *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.mode = mode
        cfg.hydra.job.config_name = config_name  # what `-cn merger_sweep` sets
        cfg.hydra.sweep.dir = "multirun/2026-12-03/12-30-05"
        cfg.hydra.job.override_dirname = ",".join(overrides)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_sweep_jobs_share_one_group_named_after_the_sweep_and_its_launch(tmp_path):
    cfg = _hydra(tmp_path, ["seed=1", "stage=merge"], RunMode.MULTIRUN, "merger_sweep")
    identity = run_identity(cfg)
    assert identity == {"group": "merger_sweep@2026-12-03_12-30-05", "job_type": "merge", "name": "seed=1,stage=merge"}
    inner = run_identity(cfg, "specialist-synthetic_swap", group="ignored-in-a-sweep")
    assert inner["group"] == identity["group"] and inner["job_type"] == "finetune"
    assert inner["name"] == "seed=1,stage=merge specialist-synthetic_swap"


def test_a_plain_multirun_is_named_after_its_stage_and_a_single_run_keeps_the_given_group(tmp_path):
    cfg = _hydra(tmp_path, ["seed=2"], RunMode.MULTIRUN)
    assert run_identity(cfg)["group"] == "pipeline@2026-12-03_12-30-05"
    cfg = _hydra(tmp_path, [], RunMode.RUN)
    assert run_identity(cfg, group="12-00-00_pipeline") == {
        "group": "12-00-00_pipeline",
        "job_type": "pipeline",
        "name": "pipeline",
    }


def test_a_tables_run_keeps_the_sweep_group_it_is_given(tmp_path):
    cfg = _hydra(tmp_path, ["stage=tables"], RunMode.MULTIRUN, "main_tables")  # as at a sweep's end
    assert run_identity(cfg, "tables-pipeline", group="pipeline@2026-12-03_12-30-05") == {
        "group": "pipeline@2026-12-03_12-30-05",
        "job_type": "tables",
        "name": "tables-pipeline",
    }
    assert sweep_group("config", "pipeline", "multirun/2026-12-03/12-30-05") == "pipeline@2026-12-03_12-30-05"
    assert sweep_group("scaling", "scaling", "/x/multirun/2026-12-03/12-30-05") == "scaling@2026-12-03_12-30-05"


class WandbLogger:
    """Stands in for Lightning's WandbLogger (the name is what build_logger recognises): records its arguments."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        WandbLogger.made.append(kwargs)

    def log_hyperparams(self, params):
        self.params = params


def test_build_logger_files_the_wandb_run_by_sweep_stage_and_overrides(tmp_path, monkeypatch):
    from r2m_lab.stages.loggers import build_logger

    monkeypatch.setattr("r2m_lab.stages.loggers._USER_WANDB_MODE", None)
    cfg = _hydra(tmp_path, ["seed=1", "logger=wandb"], RunMode.MULTIRUN, "main_tables")
    with open_dict(cfg):
        cfg.logger._target_ = f"{__name__}.WandbLogger"
        del cfg["hydra"]  # a job's config holds no hydra node (HydraConfig keeps it)
    logger = build_logger(cfg, "specialist-synthetic_swap", group="the run folder")
    made = WandbLogger.made[-1]
    assert logger.r2m_wandb_mode == "offline" and made["mode"] == "offline"
    assert (made["group"], made["job_type"], made["name"]) == (
        "main_tables@2026-12-03_12-30-05",
        "finetune",
        "seed=1,logger=wandb specialist-synthetic_swap",
    )
