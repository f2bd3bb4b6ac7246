"""Every config option composes and resolves; aliases and the stage dispatch work; bad names list the choices."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from r2m_lab.mergers import (
    Merger,
    build_merger,
    load_merger,
    load_merger_config,
    merger_hparams,
    merger_names,
    selection_grid,
)
from r2m_lab.stages.pipeline import plan_pipeline
from tests.conftest import CONF, REPO, compose_config
from tests.test_mergers import heads_for

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(tmp_path, group, option):
    # the layout group only exists under stage=preprocess (conf/stage/preprocess.yaml puts it in)
    stage = ["stage=preprocess"] if group == "layout" else []
    cfg = compose_config(tmp_path, [*stage, f"{group}={option}"], smoke=group != "debug")
    container = OmegaConf.to_container(cfg, resolve=True)
    if group == "debug":  # a global preset: it shrinks the model and the data, and swaps the logger
        assert container["backbone"]["kwargs"]["depth"] == 2 and container["logger"]["_target_"].endswith("CSVLogger")
        assert container["synthetic"]["train_videos"] == 4 and container["eval_batch_size"] == 64
    else:
        assert container[group]
    if group == "merger":  # the file's stem is the module's name, and the YAML builds a checked Merger
        assert container["merger"]["_target_"].startswith(f"r2m_lab.mergers.{option}.")
        assert isinstance(build_merger(container["merger"], n_tasks=len(container["benchmark"]["specialists"])), Merger)
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
    assert cfg.stage.name == "pipeline" and plan_pipeline(cfg).mergers["r2m"]["rank_ratio"] == 0.25


def test_pipeline_runs_every_merger_that_exists(tmp_path):
    plan = plan_pipeline(compose_config(tmp_path))
    files = {f.stem for f in (CONF / "merger").glob("*.yaml")}
    # every merger, each followed by its variants (the default run adds R²M at the reference kit's fixed setting)
    assert plan.variants == {"r2m_kit": "r2m"} and list(plan.mergers) == [
        m for name in sorted(files) for m in ((name, "r2m_kit") if name == "r2m" else (name,))
    ]
    assert merger_names() == sorted(files) and "r2m_kit" not in plan.grids
    assert (
        plan.mergers["r2m_kit"] | {"eta_mode": "core_norm", "alpha": 0.6, "rank_ratio": 0.1, "k": 1}
        == plan.mergers["r2m_kit"]
    )
    assert plan.reference_rows == ["joint", "ensemble"] and not set(plan.reference_rows) & files
    # each merger brings its own validation grid (or declares it has none)
    assert plan.grids == {n: g for n in files if (g := selection_grid(load_merger_config(n)))}
    assert plan.grids["task_arithmetic"] == {"lam": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]} and "average" not in plan.grids


@pytest.mark.parametrize("name", merger_names())
def test_a_merger_is_one_yaml_and_one_dataclass_without_defaults(name):
    node = load_merger_config(name)
    assert "_select_" in node, "every merger declares its validation grid, or null"
    merger = build_merger(node)
    fields = dataclasses.fields(merger)
    # the knobs are declared once, in the dataclass, and their defaults once, in the YAML
    assert [f.name for f in fields] == [k for k in node if not k.startswith("_")]
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields)
    assert merger.hyperparameters() == merger_hparams(node)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(merger, fields[0].name, None) if fields else setattr(merger, "x", None)


def test_pipeline_overrides_select_and_reference_rows(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            "stage.mergers=[task_arithmetic,r2m]",
            "+stage.merger_overrides.task_arithmetic.lam=0.5",
            "+stage.select.r2m=null",
            "stage.reference_rows=[ensemble]",
            "stage.ensemble_reduction=median",
        ],
    )
    plan = plan_pipeline(cfg)
    assert list(plan.mergers) == ["task_arithmetic", "r2m", "r2m_kit"] and plan.mergers["task_arithmetic"]["lam"] == 0.5
    assert list(plan.grids) == ["task_arithmetic"] and plan.reference_rows == ["ensemble"]
    assert plan.ensemble_reduction == "median"
    assert plan_pipeline(compose_config(tmp_path, ["stage.select=null"])).grids == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage.mergers=[average,nope]"], "stage.mergers names \\['nope'\\]"),
        (["stage.mergers=[average]", "+stage.merger_overrides.r2m.eta=2.0"], "do not run: \\['r2m'\\]"),
        (["+stage.merger_overrides.ties.lamda=2.0"], "merger=ties: unknown knob"),
        (["stage.mergers=[average]", "+stage.select.r2m={eta:[1.0]}"], "~stage.select.r2m"),
        (["stage.reference_rows=[ensemble,average]"], "stage.reference_rows names \\['average'\\]"),
        (["stage.ensemble_reduction=mode"], "ensemble_reduction must be one of"),
        (["+stage.merger_overrides.r2m.k=5"], "k=5 exceeds the number of specialists N=4"),
        (["+stage.variants.average={merger:average}"], "stage.variants.average: the label is already a row"),
        (["+stage.variants.x={merger:ties,lam:0.5}"], "it has unknown keys \\['lam'\\]"),
        (["+stage.variants.x={knobs:{lam:0.5}}"], "it names no merger"),
        (["+stage.variants.x={merger:ties,knobs:{lamda:0.5}}"], "merger=ties: unknown knob"),
        (["+stage.variants.x={merger:ties,select:{eta:[1]}}"], "stage.variants.x.select names \\['eta'\\]"),
        (["+stage.variants.x={merger:r2m,knobs:{k:5}}"], "k=5 exceeds the number of specialists N=4"),
    ],
)
def test_pipeline_plan_refusals(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        plan_pipeline(compose_config(tmp_path, overrides))


DUMMY_MODULE = """
from dataclasses import dataclass

from r2m_lab.mergers import Knobs
from r2m_lab.mergers.task_vectors import is_finite_number, merge_key_by_key


@dataclass(frozen=True)
class Halfway(Knobs):
    lam: float

    def check(self, n_tasks=None):
        if not is_finite_number(self.lam):
            raise ValueError(f"lam must be a finite number, got {self.lam!r}")

    def __call__(self, theta0, specialists, heads):
        return merge_key_by_key(theta0, specialists, heads, "halfway", lambda _key, taus: self.lam * taus.mean(0))
"""
DUMMY_YAML = """# a merger that exists only in this test: θ₀ + λ τ̄
_target_: halfway.Halfway
lam: 0.5
_select_: {lam: [0.25, 0.5]}
"""


def test_a_new_merger_joins_discovery_pipeline_sweep_and_bench(tmp_path, monkeypatch):
    import yaml
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from r2m_lab import bench

    extra = tmp_path / "conf"
    (extra / "merger").mkdir(parents=True)
    (extra / "merger" / "halfway.yaml").write_text(DUMMY_YAML)
    (tmp_path / "halfway.py").write_text(DUMMY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    dirs = [CONF, extra]
    names = merger_names(dirs)
    assert names == sorted([*merger_names(), "halfway"])

    # the library builds it from its YAML, with its defaults and checks, and it merges
    merger = load_merger("halfway", dirs, lam=0.25)
    assert isinstance(merger, Merger) and merger.lam == 0.25
    with pytest.raises(ValueError, match="lam must be a finite number"):
        load_merger("halfway", dirs, lam="x")
    theta0 = {"w": torch.zeros(2)}
    result = merger(theta0, {"a": {"w": torch.ones(2)}, "b": {"w": torch.full((2,), 3.0)}}, heads_for("ab"))
    assert torch.equal(result.backbone["w"], torch.full((2,), 0.5))

    # the pipeline runs it, with its own grid
    plan = plan_pipeline(compose_config(tmp_path), dirs)
    assert [m for m in plan.mergers if m not in plan.variants] == names and plan.grids["halfway"] == {
        "lam": [0.25, 0.5]
    }

    # the merger sweep's `glob(*)` expands, through Hydra's own parser, to every merger on the search path
    params = yaml.safe_load((REPO / "experiments" / "merger_sweep.yaml").read_text())["hydra"]["sweeper"]["params"]
    search_path = create_config_search_path(str(CONF))
    search_path.append("test", f"file://{extra}")
    parser = OverridesParser.create(config_loader=ConfigLoaderImpl(config_search_path=search_path))
    (sweep,) = parser.parse_overrides([f"merger={params['merger']}"])
    assert sorted(sweep.sweep_string_iterator()) == names

    # the benchmark's default list is the discovery function's (on the project's conf/)
    assert bench.default_mergers() == merger_names([CONF])


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
    from r2m_lab.stages import STAGES, stage_function

    assert set(STAGES) == {f.stem for f in (CONF / "stage").glob("*.yaml")}
    assert all(callable(stage_function(name)) for name in STAGES)  # every entry names a function that exists


@pytest.mark.parametrize("override", ["stage=nope", "merger=nope", "data=nope", "backbone=nope"])
def test_unknown_names_list_the_valid_choices(tmp_path, override):
    group = override.split("=")[0]
    with pytest.raises(MissingConfigException) as err:
        compose_config(tmp_path, [override])
    message = str(err.value)
    assert "Available options" in message
    some_option = sorted(f.stem for f in (CONF / group).glob("*.yaml"))[0]
    assert some_option in message
