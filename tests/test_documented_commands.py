"""Every command in README.md and experiments/README.md is exercised: run here, checked to fail fast as documented,
or run by a named test (on the smoke preset and the tests' small data trees where the literal command needs real
data, real weights or hours). A command added to a README without an entry in ``COVERAGE`` fails this suite.

To cover a new command, add it to ``COVERAGE`` with one or more checks:

- ``ByTest("tests/test_x.py::test_name")``: a test that runs the command's code path (the test must exist);
- ``FailsFast("message")``: run literally (``paths.root`` in a temp folder); it must stop within a minute and say this;
- ``Make("line")``: ``make -n <target>`` must show this line (the target's recipe, without running it).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

READMES = (REPO / "README.md", REPO / "experiments" / "README.md")


@dataclass(frozen=True)
class ByTest:
    """The command's code path is run by this test (``tests/<file>.py::<function>``)."""

    node: str


@dataclass(frozen=True)
class FailsFast:
    """Run literally: it must exit non-zero within ``seconds`` with ``message`` in its output."""

    message: str
    seconds: float = 60.0


@dataclass(frozen=True)
class Make:
    """``make -n <target>`` (nothing run) must print ``line``."""

    line: str


PIPELINE = ByTest("tests/test_stages.py::test_pipeline_end_to_end_and_reuse")
SWEEPS = ByTest(
    "tests/test_cli.py::test_merger_sweep_runs_every_merger_from_a_fresh_checkout_and_leaves_real_artifacts_alone"
)
MAIN_TABLES = ByTest(
    "tests/test_paper_sweeps.py::test_main_tables_sweep_builds_its_tables_and_a_failed_job_is_relaunched_exactly"
)
OTHER_TABLES = ByTest(
    "tests/test_paper_sweeps.py::test_the_other_paper_sweeps_build_their_tables_on_the_same_specialists"
)
SWEEP_SEEDS = ByTest("tests/test_paper_sweeps.py::test_every_paper_sweep_file_sweeps_training_seeds_0_1_2")
TABLES = ByTest("tests/test_results_tables.py::test_stage_tables_through_the_cli")
MULTIRUN = ByTest("tests/test_cli.py::test_multirun_merge_sweep")
REAL_DATA = ByTest("tests/test_data.py::test_real_data_finetune_then_evaluate")
AUGMENT = ByTest("tests/test_data.py::test_augmentation_knobs_change_the_pipeline")
SLURM_ABSENT = FailsFast('Could not detect "srun"')
CLUSTER = (
    ByTest("tests/test_cluster.py::test_slurm_preset_submits_one_array_with_its_knobs"),
    ByTest("tests/test_cluster.py::test_two_job_sweep_through_submitits_local_executor"),
)

COVERAGE: dict[str, tuple[ByTest | FailsFast | Make, ...]] = {
    # README.md: two commands
    "make demo": (Make("bin/python -m r2m_lab"), PIPELINE),
    "make test": (Make("WANDB_MODE=disabled"),),  # the suite itself
    # README.md: everyday use
    "python -m r2m_lab stage=finetune data=synthetic_swap": (
        ByTest("tests/test_stages.py::test_finetune_stage_writes_card_and_metrics"),
        ByTest("tests/test_cli.py::test_finetune_logs_an_offline_wandb_run_and_says_why_it_is_not_online"),
    ),
    "python -m r2m_lab stage=merge merger=r2m rank_ratio=0.1": (
        ByTest("tests/test_cli.py::test_user_merge_command_literally"),
    ),
    "python -m r2m_lab stage=evaluate merger=r2m rank_ratio=0.1": (
        ByTest("tests/test_stages.py::test_merge_and_evaluate_stages"),
    ),
    "python -m r2m_lab stage=merge merger=ties stage.evaluate=true": (
        ByTest("tests/test_merge_stage.py::test_merge_then_evaluate_in_one_job"),
        SWEEPS,
    ),
    "python -m r2m_lab stage=merge merger=task_arithmetic 'stage.select={lam:[0.1,0.3,0.5,1.0]}'": (
        ByTest("tests/test_merge_stage.py::test_selection_picks_the_best_validation_auc_and_records_the_curve"),
    ),
    "python -m r2m_lab stage=evaluate stage.model=specialist:synthetic_swap": (
        ByTest("tests/test_stages.py::test_evaluate_any_trained_model"),
    ),
    "python -m r2m_lab stage=evaluate stage.model=ensemble": (
        ByTest("tests/test_merge_stage.py::test_evaluate_ensemble_is_the_mean_of_the_specialists_scores"),
        ByTest("tests/test_report.py::test_smoke_ensemble_run_pins_metrics_json"),
    ),
    "python -m r2m_lab 'stage.mergers=[average,ties,r2m]' +stage.merger_overrides.ties.density=0.1 "
    "'stage.reference_rows=[ensemble]'": (
        ByTest("tests/test_config.py::test_pipeline_overrides_select_and_reference_rows"),
    ),
    # README.md: analysis
    "python -m r2m_lab stage=analyze": (ByTest("tests/test_analysis.py::test_analyze_smoke_cli"),),
    "python -m r2m_lab -m stage=analyze seed=0,1,2 merger=average train_missing=true": (
        ByTest("tests/test_analysis.py::test_analyze_smoke_cli"),
    ),
    "python -m r2m_lab.analysis.summary multirun/<date>/<time> --out analysis_summary.md": (
        ByTest("tests/test_analysis_summary.py::test_a_sweep_folder_reads_its_jobs_in_launch_order"),
        ByTest("tests/test_analysis_summary.py::test_headline_numbers_are_mean_and_sample_std_over_the_runs"),
    ),
    # README.md: resuming a killed fine-tune (literally: nothing to continue in a fresh root, so it stops at once)
    "python -m r2m_lab stage=finetune data=synthetic_swap resume=true": (
        FailsFast("resume=true, but there is no training checkpoint at"),
        ByTest("tests/test_resume.py::test_killed_finetune_resumes_to_the_uninterrupted_weights"),
    ),
    # README.md: predicting on a video
    "python -m r2m_lab stage=predict stage.input=suspect.mp4 stage.model=specialist:synthetic_swap": (
        ByTest("tests/test_predict.py::test_video_scores_per_frame_and_per_video_at_the_stored_threshold"),
    ),
    "python -m r2m_lab stage=predict stage.input=/videos/ merger=r2m stage.annotate=true": (
        ByTest("tests/test_predict.py::test_folder_reports_bad_files_and_faceless_videos_with_no_score"),
    ),
    "python -m r2m_lab -m stage=merge merger=average,task_arithmetic,r2m": (MULTIRUN,),
    "python -m r2m_lab logger.offline=false": (
        ByTest("tests/test_safety.py::test_wandb_mode_follows_the_environment_and_says_when_it_overrides"),
        ByTest("tests/test_cli.py::test_finetune_logs_an_offline_wandb_run_and_says_why_it_is_not_online"),
    ),
    "python -m r2m_lab logger=csv": (PIPELINE,),  # debug=smoke selects logger=csv
    "python -m r2m_lab --help": (ByTest("tests/test_cli.py::test_help_lists_groups"),),
    # README.md: real data and real backbones (no weights or data here: they must stop at once, naming what is missing)
    "python -m r2m_lab stage=finetune backbone=clip_vit_l14 "
    "backbone.weights.path=/models/ViT-L-14/open_clip_pytorch_model.bin data=faceforensics_df": (
        FailsFast("Data root for data=faceforensics_df not found"),
        REAL_DATA,
    ),
    "python -m r2m_lab stage=finetune data=faceforensics_df paths.data_dir=/data/deepfakes": (
        FailsFast("Data root for data=faceforensics_df not found: /data/deepfakes"),
        REAL_DATA,
    ),
    "python -m r2m_lab stage=finetune data=faceforensics_df data.compression=c40": (
        ByTest("tests/test_data.py::test_ffpp_reader_compression_levels_and_windows_paths"),
    ),
    "python -m r2m_lab stage=finetune data=df40_method data.method=simswap data.domain=ff": (
        ByTest("tests/test_data.py::test_df40_method_config_follows_its_overrides"),
    ),
    "python -m r2m_lab stage=finetune data=faceforensics_df data.frames_per_video=32": (REAL_DATA,),
    "python -m r2m_lab stage=evaluate benchmark=ffpp benchmark.protocols.cross_dataset.dfdc.test_frames_per_video=8": (
        REAL_DATA,
        ByTest("tests/test_data.py::test_benchmarks_list_their_protocols"),
    ),
    "python -m r2m_lab stage=finetune data=faceforensics_df data.dfb_compat=true": (
        ByTest("tests/test_data.py::test_sampling_evenly_spaced_vs_first_n"),
    ),
    "python -m r2m_lab stage=finetune data=faceforensics_df data.missing_frames=error": (
        ByTest("tests/test_data.py::test_missing_frames_skip_reports_and_error_refuses"),
    ),
    "python -m r2m_lab benchmark=df40 backbone=clip_vit_l14 backbone.weights.path=/models/ViT-L-14.bin "
    "paths.data_dir=/data/df40": (FailsFast("Backbone weights for clip_vit_l14 not found at /models/ViT-L-14.bin"),),
    "python -m r2m_lab stage=finetune backbone=clip_vit_b16 backbone.recipe.augment.flip.p=0": (AUGMENT,),
    "python -m r2m_lab stage=finetune backbone=clip_vit_b16 backbone.recipe.augment.jpeg.quality_range=[60,100]": (
        AUGMENT,
    ),
    "python -m r2m_lab stage=finetune backbone=clip_vit_b16 backbone.recipe.augment.blur=null": (AUGMENT,),
    "python -m r2m_lab stage=finetune data=synthetic_swap trainer=ddp trainer.accelerator=cpu trainer.devices=2 "
    "trainer.precision=32-true": (ByTest("tests/test_ddp.py::test_ddp_on_cpu_trains_a_specialist_on_two_processes"),),
    # README.md: preprocessing, on the small video trees of tests/test_preprocess.py
    "python -m r2m_lab stage=preprocess layout=ffpp stage.input=/raw/FaceForensics++ "
    "layout.split_dir=/raw/ffpp_splits": (
        ByTest("tests/test_preprocess.py::test_ffpp_crops_follow_the_face_and_the_index_validates"),
        FailsFast("/raw/FaceForensics++ does not exist"),
    ),
    "python -m r2m_lab stage=preprocess layout=celebdf stage.input=/raw/Celeb-DF-v2 stage.workers=8": (
        ByTest("tests/test_preprocess.py::test_celebdf_layout_test_list_labels_and_parallel_workers"),
    ),
    "python -m r2m_lab stage=preprocess layout=folder stage.input=/raw/mine layout.dataset=Mine "
    "layout.label=Mine_fake layout.label_value=1": (
        ByTest("tests/test_preprocess.py::test_folder_layout_centre_policy_marks_faceless_frames"),
    ),
    "python -m r2m_lab benchmark=ffpp paths.data_dir=/data/deepfakes "
    "paths.index_dir=/opt/DeepfakeBench/preprocessing/dataset_json": (
        ByTest("tests/test_released_indexes.py::test_one_setting_for_the_index_folder"),
        FailsFast("/data/deepfakes"),
    ),
    "python -m r2m_lab stage=finetune data=df40_method data.method=simswap data.val_source=train": (
        ByTest("tests/test_released_indexes.py::test_val_held_out_of_train_by_video_when_the_index_has_none"),
    ),
    # README.md: CLIP weights and released detectors (made small by the tests, in each layout)
    "python -m r2m_lab.layouts convert-torchscript ~/.cache/clip/ViT-L-14.pt /models/ViT-L-14.safetensors "
    "--i-trust-this-file": (
        ByTest("tests/test_layouts.py::test_torchscript_archive_is_refused_then_converted_knowingly"),
    ),
    "python -m r2m_lab.layouts inspect FILE": (
        ByTest("tests/test_layouts.py::test_inspect_names_the_layout_and_what_the_conversion_drops"),
    ),
    "python -m r2m_lab stage=import benchmark=df40 backbone=clip_vit_l14 "
    "backbone.weights.path=/models/clip-vit-large-patch14/model.safetensors "
    "'stage.checkpoints={df40_fs_ff:/ckpt/fs/ckpt_best.pth,df40_fr_ff:/ckpt/fr/ckpt_best.pth,"
    "df40_efs_ff:/ckpt/efs/ckpt_best.pth}'": (
        ByTest("tests/test_import.py::test_import_then_merge_average"),
        ByTest("tests/test_import.py::test_import_refuses_what_does_not_fit"),
    ),
    "python -m r2m_lab stage=merge benchmark=df40 backbone=clip_vit_l14 "
    "backbone.weights.path=/models/clip-vit-large-patch14/model.safetensors merger=r2m": (
        ByTest("tests/test_import.py::test_import_then_merge_average"),
        FailsFast("/models/clip-vit-large-patch14/model.safetensors"),
    ),
    # a template ("..." stands for the layout arguments above): its knobs are the preprocess tests' settings
    "python -m r2m_lab stage=preprocess ... stage.frames_per_video=32 stage.size=256 stage.margin=1.3 "
    "stage.output=/data/deepfakes": (ByTest("tests/test_preprocess.py::test_preprocess_then_finetune_and_evaluate"),),
    # README.md prose
    "python -m r2m_lab": (PIPELINE,),
    "make bench-merge": (Make("bin/python -m r2m_lab.bench"), ByTest("tests/test_bench.py::test_bench_merge_smoke")),
    "make bench-train": (
        Make("bin/python -m r2m_lab.bench_train"),
        ByTest("tests/test_bench.py::test_bench_train_smoke"),
    ),
    "make lint": (Make("bin/ruff check ."),),
    "make test-fast": (Make('-m "not slow"'),),
    # experiments/README.md
    "python -m r2m_lab -cd experiments -cn <file stem> [overrides]": (
        SWEEPS,
        ByTest("tests/test_cli.py::test_sweep_files_compose"),
    ),
    "python -m r2m_lab -cd experiments -cn merger_sweep": (SWEEPS,),
    # a multirun (MULTIRUN) whose jobs select η on validation, then evaluate, as the ablation sweep's jobs do (SWEEPS)
    "python -m r2m_lab -m stage=merge merger=r2m rank_ratio=0.02,0.05,0.1,0.2,0.5,1.0 stage.evaluate=true "
    "'stage.select={eta:[0,1,2,3,5,8,12]}'": (MULTIRUN, SWEEPS),
    "python -m r2m_lab -cd experiments -cn r2m_ablation": (OTHER_TABLES, SWEEP_SEEDS),
    "python -m r2m_lab -cd experiments -cn main_tables": (MAIN_TABLES, SWEEP_SEEDS),
    "python -m r2m_lab -cd experiments -cn scaling": (
        OTHER_TABLES,
        SWEEP_SEEDS,
        ByTest("tests/test_scaling.py::test_scaling_merges_every_subset_on_its_own_validation_and_scores_once"),
    ),
    "python -m r2m_lab -cd experiments -cn expansion": (
        OTHER_TABLES,
        SWEEP_SEEDS,
        ByTest("tests/test_expansion.py::test_expansion_adds_one_family_per_step_against_joint_retraining"),
    ),
    "python -m r2m_lab -cd experiments -cn head_ablation": (
        OTHER_TABLES,
        SWEEP_SEEDS,
        ByTest("tests/test_heads.py::test_refit_sees_validation_only_and_reproduces_sklearn"),
    ),
    "python -m r2m_lab stage.families=[swap,reenact,synthesis] 'stage.reference_rows=[ensemble]'": (
        ByTest("tests/test_families.py::test_adding_a_family_trains_only_its_specialist_and_re_merges"),
    ),
    "python -m r2m_lab stage=tables 'stage.runs=[multirun/2026-12-03/12-00-00]'": (TABLES, MAIN_TABLES),
    "python -m r2m_lab stage=tables 'stage.runs=[<sweep folder>]'": (TABLES, MAIN_TABLES),
    'make tables RUNS="multirun/2026-12-03/12-00-00 multirun/2026-12-03/13-10-00"': (
        Make(
            """-m r2m_lab stage=tables 'stage.runs=["multirun/2026-12-03/12-00-00","multirun/2026-12-03/13-10-00"]'"""
        ),
        TABLES,
    ),
    "python -m r2m_lab -cd experiments -cn main_tables benchmark=df40 backbone=clip_vit_l14 "
    "backbone.weights.path=/models/clip-vit-large-patch14/model.safetensors paths.data_dir=/data/df40 device=cuda": (
        FailsFast("Backbone weights for clip_vit_l14 not found at /models/clip-vit-large-patch14/model.safetensors"),
        MAIN_TABLES,
    ),
    # README.md: cluster sweeps (no SLURM here: submitit stops before submitting anything; the array it would submit
    # is rendered by a test, and a two-job sweep runs through submitit's local executor)
    "python -m r2m_lab -cd experiments -cn main_tables benchmark=df40 backbone=clip_vit_l14 "
    "backbone.weights.path=/models/clip-vit-large-patch14/model.safetensors paths.data_dir=/data/df40 device=cuda "
    "hydra/launcher=slurm hydra.launcher.partition=gpu hydra.launcher.timeout_min=720": (SLURM_ABSENT, *CLUSTER),
    "python -m r2m_lab -m stage=finetune data=df40_fs_ff backbone=clip_vit_l14 "
    "backbone.weights.path=/models/clip-vit-large-patch14/model.safetensors paths.data_dir=/data/df40 trainer=ddp "
    "trainer.num_nodes=2 hydra/launcher=slurm hydra.launcher.nodes=2 hydra.launcher.gpus_per_node=4": (
        SLURM_ABSENT,
        *CLUSTER,
    ),
}


def documented_commands(path: Path) -> list[str]:
    """Commands a reader would copy: lines of code blocks, and inline code in prose, that start with
    ``python -m r2m_lab`` or ``make``; a trailing ``# comment`` is dropped and whitespace normalised."""
    text = path.read_text()
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        block = re.sub(r"\\\n\s*", " ", block)  # a command continued over lines with a trailing backslash
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith(("python -m r2m_lab", "make ")):
                found.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [" ".join(c.split()) for c in re.findall(r"`((?:python -m r2m_lab|make )[^`]*)`", prose)]
    return list(dict.fromkeys(found))


def all_documented() -> list[str]:
    return list(dict.fromkeys(c for readme in READMES for c in documented_commands(readme)))


def test_every_documented_command_has_a_check():
    documented = all_documented()
    assert len(documented) >= 30, "the parser found too few commands: has the README's format changed?"
    missing = [c for c in documented if c not in COVERAGE]
    assert not missing, "README commands without a check (add them to COVERAGE):\n" + "\n".join(missing)
    stale = [c for c in COVERAGE if c not in documented]
    assert not stale, "COVERAGE entries no README documents any more (remove them):\n" + "\n".join(stale)
    assert all(COVERAGE[c] for c in documented)


def test_every_named_test_exists():
    for checks in COVERAGE.values():
        for check in checks:
            if isinstance(check, ByTest):
                file, function = check.node.split("::")
                tree = ast.parse((REPO / file).read_text())  # parsed, not imported: no heavy imports here
                names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
                assert function in names, f"{check.node} does not exist"


@pytest.mark.parametrize(
    ("command", "line"),
    [(c, k.line) for c, ks in COVERAGE.items() for k in ks if isinstance(k, Make)],
    ids=lambda v: v if v.startswith("make") else "",
)
def test_make_targets_run_what_the_readme_says(command, line, tmp_path):
    # a venv path that does not exist: make -n prints the install step and the target's recipe, and runs nothing
    proc = subprocess.run(
        [*shlex.split(command), "-n", f"VENV={tmp_path}/venv"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert line in proc.stdout, proc.stdout


FAILS_FAST = [(c, k) for c, ks in COVERAGE.items() for k in ks if isinstance(k, FailsFast)]


@pytest.mark.slow
@pytest.mark.parametrize(("command", "check"), FAILS_FAST, ids=[c for c, _ in FAILS_FAST])
def test_command_without_its_data_or_weights_stops_at_once_saying_what_is_missing(command, check, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    args = shlex.split(command)[3:]  # after "python -m r2m_lab"
    # run from a temp folder: a sweep's `-cd experiments` (relative to the checkout, as documented) made absolute
    args = [str(REPO / a) if i and args[i - 1] == "-cd" else a for i, a in enumerate(args)]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "r2m_lab", *args, f"paths.root={tmp_path}"],
        cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=check.seconds,
    )
    assert proc.returncode != 0
    assert check.message in proc.stderr, proc.stderr[-2000:]
    assert time.perf_counter() - start < check.seconds
    assert not (tmp_path / "artifacts").exists(), "nothing is trained or written before the refusal"
