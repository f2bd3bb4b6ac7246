"""stage=pipeline: the whole method on one benchmark — θ₀, specialists, joint, every merger, every protocol, table.

The mergers are discovered from ``conf/merger/`` (`r2m_lab.mergers.merger_names`), each composed from its own YAML
at run time with ``stage.merger_overrides`` applied, and each chooses its scalar on validation from its YAML's
``_select_`` grid unless ``stage.select`` replaces it. The reference rows (``stage.reference_rows``: the output
ensemble and the joint model) are not mergers: they are evaluated beside the merges, and the joint model's task
vector is compared with the specialists' in the report (``reference_rows.joint.diagnostics``).
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from r2m_lab.backbones import check_weights_file
from r2m_lab.evaluation.ensemble import REDUCTIONS
from r2m_lab.mergers import load_merger_config, merger_names, selection_grid
from r2m_lab.mergers.task_vectors import StateDict, cosines_from_gram, task_vector_gram
from r2m_lab.processes import exit_with_parent
from r2m_lab.stages.artifacts import merged_path, output_dir, specialist_path
from r2m_lab.stages.base_model import ensure_base
from r2m_lab.stages.config_nodes import plain
from r2m_lab.stages.evaluate import evaluate_models, write_report
from r2m_lab.stages.families import chosen_families, restrict_benchmark
from r2m_lab.stages.finetune import train_detector
from r2m_lab.stages.merge import (
    SELECTION_SPLIT,
    merge_specialists,
    open_specialists,
    select_and_merge,
    validation_frames,
    validation_scorer,
)
from r2m_lab.stages.merger_config import merger_hparams, merger_name, validate_merger
from r2m_lab.stages.rows import merger_row, reference_row, specialist_row, theta0_entry
from r2m_lab.stages.screen import screen, screen_mode
from r2m_lab.stages.timing import stopwatch
from r2m_lab.threads import apply_threads, parse_threads
from r2m_lab.weights import Checkpoint

log = logging.getLogger(__name__)

REFERENCE_ROWS = ("joint", "ensemble")  # in the report's order (the paper's: joint training, then the ensemble)
# The output ensemble's reductions (r2m_lab.evaluation combines the scores); checked here before hours of training.
JOINT = "joint"


@dataclass
class PipelinePlan:
    """What the pipeline runs, every part checked before any training."""

    mergers: dict[str, dict[str, Any]]  # row label → resolved merger config (its YAML + overrides / variant knobs)
    grids: dict[str, dict[str, list[Any]]]  # row label → validation grid; rows without one are absent
    variants: dict[str, str]  # row label → its merger's name, for the rows of stage.variants
    reference_rows: list[str]  # a subset of REFERENCE_ROWS, in that order
    ensemble_reduction: str


def _names(value: Any, what: str, available: Sequence[str]) -> list[str]:
    """``all`` or a list of names, checked against ``available``."""
    if value == "all":
        return list(available)
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"stage.{what} must be `all` or a list of names from {list(available)}, got {value!r}")
    unknown = sorted(set(value) - set(available))
    if unknown:
        raise ValueError(f"stage.{what} names {unknown}, which do not exist; the choices are {list(available)}")
    return [str(v) for v in value]


def plan_pipeline(cfg: DictConfig, dirs: Sequence[Path | str] | None = None) -> PipelinePlan:
    """Resolve ``stage.mergers``, ``stage.merger_overrides``, ``stage.select`` and ``stage.reference_rows``.

    ``dirs``: where to look for ``merger/*.yaml`` (default: the project's conf and Hydra's search path). Every
    merger's knobs are checked (with N = the benchmark's specialists); an override or grid for a merger that does
    not run, or for a knob it does not have, is refused.
    """
    names = _names(plain(cfg.stage.mergers), "mergers", merger_names(dirs))
    overrides = plain(cfg.stage.get("merger_overrides")) or {}
    idle = sorted(set(overrides) - set(names))
    if idle:
        raise ValueError(f"stage.merger_overrides has knobs for mergers that do not run: {idle} (running {names})")
    mergers = {name: load_merger_config(name, dirs, root=cfg, **(overrides.get(name) or {})) for name in names}
    for merger_cfg in mergers.values():  # every knob checked before hours of training
        validate_merger(cfg, merger_cfg)

    select = plain(cfg.stage.get("select"))
    grids: dict[str, dict[str, list[Any]]] = {}
    if select is not None:
        idle = sorted(set(select) - set(names))
        if idle:
            raise ValueError(
                f"stage.select has grids for mergers that do not run: {idle}; drop them with "
                + " ".join(f"~stage.select.{u}" for u in idle)
            )
        for name, merger_cfg in mergers.items():
            grid = select[name] if name in select else selection_grid(merger_cfg)
            if grid:
                grids[name] = dict(grid)

    variants = plan_variants(cfg, dirs, taken=[*names, *REFERENCE_ROWS])
    for label, (merger_cfg, grid) in variants.items():
        mergers[label] = merger_cfg
        if grid and select is not None:
            grids[label] = grid
    # Rows in display order: each merger followed by its variants (r2m, then r2m_kit), other variants last.
    order = [m for name in names for m in (name, *(v for v in variants if merger_name(variants[v][0]) == name))]
    order += [v for v in variants if v not in order]
    mergers = {label: mergers[label] for label in order}

    rows = _names(plain(cfg.stage.get("reference_rows", [])), "reference_rows", REFERENCE_ROWS)
    if JOINT in rows and cfg.benchmark.get("joint") is None:
        raise ValueError(
            f"benchmark {cfg.benchmark.name} has no joint data config; drop the row with "
            f"stage.reference_rows=[{', '.join(r for r in rows if r != JOINT)}]"
        )
    reduction = str(cfg.stage.get("ensemble_reduction", "mean"))
    if reduction not in REDUCTIONS:
        raise ValueError(f"stage.ensemble_reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    return PipelinePlan(
        mergers,
        grids,
        {label: merger_name(m) for label, (m, _) in variants.items()},
        [r for r in REFERENCE_ROWS if r in rows],
        reduction,
    )


def plan_variants(
    cfg: DictConfig, dirs: Sequence[Path | str] | None, taken: Sequence[str]
) -> dict[str, tuple[dict[str, Any], dict[str, list[Any]] | None]]:
    """``stage.variants``: extra rows, each a named merger config, label → (merger config, validation grid or None).

    A variant is ``{merger: <name>, knobs: {knob: value}, select: <grid> | null}``; without ``select`` it chooses
    on its merger's own ``_select_`` grid (null: runs at its knobs). This is how one run holds R²M twice (chosen on
    validation, and at the reference kit's fixed setting) or an ablation (one knob flipped per row) on the same
    specialists, each evaluated once.
    """
    variants = plain(cfg.stage.get("variants")) or {}
    out: dict[str, tuple[dict[str, Any], dict[str, list[Any]] | None]] = {}
    for label, spec in variants.items():
        if label in taken:
            raise ValueError(f"stage.variants.{label}: the label is already a row ({sorted(taken)}); rename it")
        spec = dict(spec or {})
        unknown = sorted(set(spec) - {"merger", "knobs", "select"})
        if unknown or "merger" not in spec:
            raise ValueError(
                f"stage.variants.{label} must be {{merger: <name>, knobs: {{...}}, select: <grid> | null}}; "
                + (f"it has unknown keys {unknown}" if unknown else "it names no merger")
            )
        merger_cfg = load_merger_config(str(spec["merger"]), dirs, root=cfg, **(spec.get("knobs") or {}))
        validate_merger(cfg, merger_cfg)
        grid = spec["select"] if "select" in spec else selection_grid(merger_cfg)
        if grid:
            unknown = sorted(set(grid) - set(merger_hparams(merger_cfg)))
            if unknown:
                raise ValueError(
                    f"stage.variants.{label}.select names {unknown}, which are not knobs of {spec['merger']}"
                )
        out[str(label)] = (merger_cfg, dict(grid) if grid else None)
    return out


def check_benchmark_data(cfg: DictConfig, plan: PipelinePlan) -> None:
    """The backbone's weight file and every data set the run will read (specialists, joint, validation, every
    protocol) must be there before θ₀ or any specialist is trained: a missing file, root or index stops at once,
    naming the paths and where to get the data."""
    check_weights_file(plain(cfg.backbone))
    nodes = [*cfg.benchmark.specialists.values(), *cfg.benchmark.validation.values()]
    nodes += [d for sets in cfg.benchmark.protocols.values() for d in sets.values()]
    if JOINT in plan.reference_rows:
        nodes.append(cfg.benchmark.joint)
    for node in nodes:
        instantiate(node).check_available()


def task_vector_geometry(
    theta0: StateDict, specialists: Mapping[str, StateDict], joint: StateDict | None = None
) -> tuple[list[str], list[list[float]], dict[str, Any] | None]:
    """The specialists' task-vector cosine matrix and, with a joint model, how τ_joint relates to every τᵢ.

    One streaming pass over θ₀, the specialists and the joint model. Returns (names, N×N cosines, joint facts or
    None); the joint facts are ‖τ_joint‖, ‖τᵢ‖ and cos(τ_joint, τᵢ): how much of joint training lies along the
    specialists' directions, i.e. what a weight-space merge could recover.
    """
    if joint is not None and JOINT in specialists:
        raise ValueError(f"a specialist may not be named {JOINT!r}: the name is reserved for the joint model")
    models = dict(specialists) if joint is None else {**specialists, JOINT: joint}
    order, gram = task_vector_gram(theta0, models)  # (M, M), M = N (+ 1)
    names = [n for n in order if n != JOINT]
    rows = [order.index(n) for n in names]
    cosines = cosines_from_gram(gram[rows][:, rows])
    if joint is None:
        return names, cosines, None
    j = order.index(JOINT)
    norms = gram.diagonal().clamp_min(0).sqrt().tolist()
    with_joint = cosines_from_gram(gram)[j]
    facts = {
        "joint_task_vector_norm": norms[j],
        "task_vector_norms": {n: norms[order.index(n)] for n in names},
        "cosine_with_joint": {n: with_joint[order.index(n)] for n in names},
    }
    return names, cosines, facts


def finetune_lanes(cfg: DictConfig, jobs: int) -> tuple[int, int | None]:
    """How the pipeline fine-tunes: ``(workers, threads per worker)``; ``(1, None)`` is one after the other in this
    process, with this process's thread count.

    Side by side only when training runs on the CPU in one process and there are at least two fine-tunes:
    ``threads=N`` runs ``cores // N`` workers of N threads each (at most ``jobs``); ``threads=auto`` runs one
    single-thread worker per core when the backbone says it is small enough (``backbone.cpu_side_by_side``, true
    for the tiny ViT, false for CLIP, whose steps are large enough to keep every core busy). The pipeline's own
    process keeps its count (every core under ``auto``) for θ₀, the merges and the evaluation. Measured on a 2-core
    AMD EPYC with the tiny ViT (64 px, batch 64): one two-thread training step 207-221 ms, two single-thread
    processes 1.3x the images/s of one two-thread process (thread hand-offs at every small op cost more than the
    second core gives); the default pipeline's whole fine-tune phase (four specialists and the joint model, whose one
    job is most of a lane) 395 s side by side against 444 s one after the other on two threads (1.12x).
    """
    threads = parse_threads(cfg.get("threads"))
    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    one_process = str(trainer.get("strategy", "auto")) == "auto" and str(trainer.get("devices", 1)) in ("1", "auto")
    if jobs < 2 or not on_cpu or not one_process:
        return 1, None
    cores = len(os.sched_getaffinity(0))
    if threads is None:
        if not bool(cfg.backbone.get("cpu_side_by_side", False)):
            return 1, None
        threads = 1
    workers = min(jobs, cores // threads)
    return (workers, threads) if workers > 1 else (1, None)


def train_side_by_side(
    cfg: DictConfig, joint: bool, reuse: bool, group: str, workers: int, threads: int, timings: dict[str, float]
) -> None:
    """Fine-tune the specialists (and the joint model) in ``workers`` spawned processes of ``threads`` threads each.

    Each fine-tune seeds itself (``train_detector``), so it writes the same weights as in the pipeline's own process
    with the same thread count (another count can change float reductions, hence the weights' last bits). The joint
    model (the longest job) is handed out first. Each job's wall-clock seconds go to ``timings`` under
    ``finetune/<key>``, as when they run one after the other.
    """
    from hydra.core.hydra_config import HydraConfig

    jobs = ([(JOINT, "joint")] if joint else []) + [(key, "specialist") for key in cfg.benchmark.specialists]
    hydra_cfg = HydraConfig.instance().cfg if HydraConfig.initialized() else None  # resolves ${hydra:...} there
    root = logging.getLogger()
    log_files = [h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler)]  # the run's log
    job_cfg = copy.deepcopy(cfg)
    with open_dict(job_cfg):  # two progress bars would overwrite each other's line; the log says what happens
        job_cfg.trainer.enable_progress_bar = False
    log.info("Fine-tuning %d models in %d processes side by side (%d thread(s) each)", len(jobs), workers, threads)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited OpenMP or RNG state
    # a killed pipeline takes its workers with it (they resume from their checkpoints next time)
    pool_kwargs = {"initializer": exit_with_parent, "initargs": (os.getpid(),)}
    with ProcessPoolExecutor(workers, mp_context=context, **pool_kwargs) as pool:
        futures = {
            key: pool.submit(_finetune_job, job_cfg, hydra_cfg, key, kind, reuse, group, threads, log_files, root.level)
            for key, kind in jobs
        }
        for key, future in futures.items():
            timings[f"finetune/{key}"] = future.result()  # re-raises a job's error here, with its traceback


def _finetune_job(
    cfg: DictConfig,
    hydra_cfg: DictConfig | None,
    key: str,
    kind: str,
    reuse: bool,
    group: str,
    threads: int,
    log_files: Sequence[str],
    level: int,
) -> float:
    """One fine-tune in a worker process of :func:`train_side_by_side`; returns its wall-clock seconds."""
    if hydra_cfg is not None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import setup_globals

        setup_globals()  # the ${hydra:...} resolver
        HydraConfig.instance().cfg = hydra_cfg
    fmt = logging.Formatter(f"[%(asctime)s][%(name)s][%(levelname)s] - [{key}] %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(), *(logging.FileHandler(f) for f in log_files)]
    for handler in handlers:
        handler.setFormatter(fmt)
    logging.basicConfig(level=level, handlers=handlers, force=True)
    apply_threads(threads)
    data_cfg = cfg.benchmark.joint if kind == JOINT else cfg.benchmark.specialists[key]
    start = time.perf_counter()
    train_detector(cfg, data_cfg, kind, reuse, group)
    return round(time.perf_counter() - start, 2)


def pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run every step, reusing artifacts whose fingerprint matches (``stage.reuse``); return the report."""
    reuse = bool(cfg.stage.reuse)
    split = str(cfg.stage.get("select_split", SELECTION_SPLIT))
    group = output_dir(cfg).name
    timings: dict[str, float] = {}
    timed = stopwatch(timings)

    families = chosen_families(cfg, plain(cfg.stage.get("families", "all")))
    cfg = restrict_benchmark(cfg, families)  # the full benchmark unless stage.families picks some of its families
    plan = plan_pipeline(cfg)
    screen_mode(cfg)  # a bad stage.screen fails before any training
    check_benchmark_data(cfg, plan)
    timed("base", ensure_base, cfg)
    checkpoints: dict[str, Path] = {}
    workers, lane_threads = finetune_lanes(cfg, len(cfg.benchmark.specialists) + (JOINT in plan.reference_rows))
    if workers > 1:  # side by side in worker processes (see finetune_lanes)
        assert lane_threads is not None
        timed(
            "finetune",
            train_side_by_side,
            cfg,
            JOINT in plan.reference_rows,
            reuse,
            group,
            workers,
            lane_threads,
            timings,
        )
    for key, data_cfg in cfg.benchmark.specialists.items():
        if workers == 1:
            timed(f"finetune/{key}", train_detector, cfg, data_cfg, "specialist", reuse, group)
        checkpoints[f"specialist:{key}"] = specialist_path(cfg, data_cfg.name)
    references: dict[str, dict[str, Any]] = {}
    base, specialists = open_specialists(cfg)
    screening = timed("screen", screen, cfg, base, specialists)
    joint = None
    if JOINT in plan.reference_rows:
        if workers == 1:
            timed("finetune/joint", train_detector, cfg, cfg.benchmark.joint, "joint", reuse, group)
        checkpoints[JOINT] = specialist_path(cfg, cfg.benchmark.joint.name)
        joint = Checkpoint(checkpoints[JOINT])
        if joint.base_hash != base.base_hash:
            raise ValueError(f"the joint model {joint.path} was not fine-tuned from θ₀ {base.path.name}")

    names, matrix, joint_facts = task_vector_geometry(
        base.backbone, {n: c.backbone for n, c in specialists.items()}, joint.backbone if joint else None
    )
    if joint_facts is not None:
        references[JOINT] = {"checkpoint": str(checkpoints[JOINT]), "diagnostics": joint_facts}
        log.info("joint: %s; cosine(τ_joint, τᵢ) = %s", checkpoints[JOINT], joint_facts["cosine_with_joint"])
    rows = {f"specialist:{key}": specialist_row(key) for key in families}
    rows.update({r: reference_row(families) for r in plan.reference_rows})
    merge_cards = {}
    val_scorer = validation_scorer(cfg, validation_frames(cfg, split)) if plan.grids else None  # one decode for all
    for label, merger_cfg in plan.mergers.items():
        if label in plan.grids:
            card = timed(
                f"merge/{label}",
                select_and_merge,
                cfg,
                merger_cfg,
                plan.grids[label],
                split,
                reuse,
                label=label,
                scorer=val_scorer,
            )
        else:
            card = timed(f"merge/{label}", merge_specialists, cfg, merger_cfg, reuse)
        merge_cards[label] = {k: card[k] for k in ("hparams", "merge_seconds", "diagnostics", "selection") if k in card}
        rows[label] = merger_row(card, families, variant=label if label in plan.variants else None)
        checkpoints[label] = Path(card.get("checkpoint_path", merged_path(cfg, merger_cfg)))

    del val_scorer  # its decoded validation batches: the evaluation decodes every set anew

    members = [m for m in checkpoints if m.startswith("specialist:")]
    ensemble = "ensemble" in plan.reference_rows
    if ensemble:
        references["ensemble"] = {"reduction": plan.ensemble_reduction, "members": members}
    report = timed(
        "evaluate",
        evaluate_models,
        cfg,
        checkpoints,
        ensemble=members if ensemble else (),
        reduction=plan.ensemble_reduction,
    )
    # The paper's row order: specialists, joint, ensemble, then the merges.
    order = [*members, *plan.reference_rows, *plan.mergers]
    report = report.reordered(order)
    extra = {
        "stage": "pipeline",
        "backbone": str(cfg.backbone.name),
        "seed": int(cfg.seed),
        "theta0": theta0_entry(base),
        "families": families,
        "rows": {label: rows[label] for label in report.models},
        "task_vector_cosines": {"names": names, "matrix": matrix},
        "merges": merge_cards,
        "reference_rows": references,
        "screening": screening,
        "timings_seconds": timings,
        "threads": torch.get_num_threads(),  # CPU threads of this process (the `threads` knob): timings depend on it
        # how the fine-tunes ran: processes side by side and threads in each (weights' last bits depend on the count)
        "finetune_lanes": {"processes": workers, "threads": lane_threads or torch.get_num_threads()},
        "config": plain(cfg),
    }
    metrics = write_report(
        cfg, report, title=f"{cfg.benchmark.name}: specialists, joint training and merges", extra=extra
    )
    log.info("Timings (s): %s", timings)
    return metrics
