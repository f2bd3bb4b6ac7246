"""Every config option composes and resolves; aliases and the stage dispatch work; bad names list the choices."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONF, compose_config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(tmp_path, group, option):
    cfg = compose_config(tmp_path, [f"{group}={option}"], smoke=group != "debug")
    container = OmegaConf.to_container(cfg, resolve=True)
    if group == "debug":  # a global preset: it shrinks the model and the data, and swaps the logger
        assert container["backbone"]["kwargs"]["depth"] == 2 and container["logger"]["_target_"].endswith("CSVLogger")
        assert container["synthetic"]["train_videos"] == 4 and container["eval_batch_size"] == 64
    else:
        assert container[group]
    if group == "merger":
        assert container["merger"]["_target_"] == f"r2m_lab.mergers.{option}.merge"
    if group == "data":  # df40_method is the per-method template: its name follows data.method and data.domain
        assert container["data"]["name"] == ("df40_simswap_ff" if option == "df40_method" else option)


def test_defaults_are_the_synthetic_pipeline(tmp_path):
    cfg = compose_config(tmp_path, smoke=False)
    assert cfg.stage.name == "pipeline"
    assert cfg.backbone.name == "tiny"
    assert cfg.benchmark.name == "synthetic"
    assert cfg.logger._target_.endswith("WandbLogger") and cfg.logger.offline is True


def test_rank_ratio_alias_reaches_r2m(tmp_path):
    cfg = compose_config(tmp_path, ["merger=r2m", "rank_ratio=0.25"])
    assert cfg.merger.rank_ratio == 0.25
    assert cfg.stage.name == "pipeline" and cfg.stage.mergers.r2m.rank_ratio == 0.25


def test_pipeline_runs_every_merger_that_exists(tmp_path):
    cfg = compose_config(tmp_path)
    files = {f.stem for f in (CONF / "merger").glob("*.yaml")}
    assert set(cfg.stage.mergers) == files


def test_benchmark_protocols(tmp_path):
    cfg = compose_config(tmp_path)
    bench = cfg.benchmark
    assert list(bench.protocols) == ["in_distribution", "cross_domain", "unseen"]
    assert [d.domain for d in bench.protocols.in_distribution.values()] == ["A"] * 4
    assert [d.domain for d in bench.protocols.cross_domain.values()] == ["B"] * 4
    unseen = {d.name for d in bench.protocols.unseen.values()}
    assert unseen == {"synthetic_djpeg", "synthetic_grid", "synthetic_common"}
    # the validation sets are the specialists' own families: selection never touches a test or unseen split
    assert [d.name for d in bench.validation.values()] == [d.name for d in bench.specialists.values()]


def test_stage_dispatch_covers_every_stage_config():
    from r2m_lab.stages import STAGES

    assert set(STAGES) == {f.stem for f in (CONF / "stage").glob("*.yaml")}


@pytest.mark.parametrize("override", ["stage=nope", "merger=nope", "data=nope", "backbone=nope"])
def test_unknown_names_list_the_valid_choices(tmp_path, override):
    group = override.split("=")[0]
    with pytest.raises(MissingConfigException) as err:
        compose_config(tmp_path, [override])
    message = str(err.value)
    assert "Available options" in message
    some_option = sorted(f.stem for f in (CONF / group).glob("*.yaml"))[0]
    assert some_option in message
