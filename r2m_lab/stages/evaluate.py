"""stage=evaluate: score detectors on every protocol of the benchmark; metrics, score CSVs, ROC curves, heatmaps.

Thresholds are fitted on the benchmark's *validation* sets (EER point) and only applied to the test sets.
:func:`evaluate_models` builds the typed :class:`~r2m_lab.evaluation.report.RunReport`; :func:`write_report` renders
it through the writers of :mod:`r2m_lab.evaluation.writers`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from r2m_lab.data.sources import FrameSet
from r2m_lab.detector import Detector
from r2m_lab.evaluation import writers
from r2m_lab.evaluation.ensemble import check_reduction, combine
from r2m_lab.evaluation.report import VALIDATION, ModelResult, RunReport, ScoredSet
from r2m_lab.evaluation.scoring import UniqueFrameScorer
from r2m_lab.stages.artifacts import command, merged_path, output_dir, specialist_names, specialist_path
from r2m_lab.stages.loggers import build_logger, close_logger
from r2m_lab.stages.merger_config import merger_name
from r2m_lab.stages.models import load_detector, model_input_config, resolve_device
from r2m_lab.stages.specialists import ensure_specialists
from r2m_lab.weights import Checkpoint

log = logging.getLogger(__name__)

MODELS_HELP = "merged | joint | ensemble | specialist:<data name> | /path/to/checkpoint.safetensors"


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.stage.model`` on every protocol; return the metrics.json payload.

    ``merged`` is the merge of the current ``merger`` config; ``joint`` the detector fine-tuned on the benchmark's
    joint data config; ``ensemble`` the output ensemble of the benchmark's specialists (each scored, then their
    P(fake) reduced per frame with ``stage.ensemble_reduction``: mean | median | max), reported beside them.
    """
    check_reduction(str(cfg.stage.ensemble_reduction))  # a bad knob is refused whatever the model
    return evaluate_model(cfg, str(cfg.stage.model))


def evaluate_model(
    cfg: DictConfig, spec: str, label: str | None = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluate one model spec (see :func:`evaluate`), write the report and return its metrics.json payload;
    ``extra`` goes into metrics.json."""
    if spec == "ensemble":
        reduction = ensemble_reduction(cfg)
        ensure_specialists(cfg)  # train_missing=true trains what the ensemble lacks; else the commands are named
        members = {f"specialist:{n}": resolve_model(cfg, f"specialist:{n}")[1] for n in specialist_names(cfg)}
        report = evaluate_models(cfg, members, ensemble=list(members), reduction=reduction)
        title = f"ensemble of {len(members)} specialists on {cfg.benchmark.name}"
    else:
        if spec == "joint":
            ensure_specialists(cfg, specialists=False, joint=True)
        default_label, path = resolve_model(cfg, spec)
        label = label or default_label
        report = evaluate_models(cfg, {label: path})
        title = f"{label} on {cfg.benchmark.name}"
    return write_report(cfg, report, title=title, extra=extra)


def ensemble_reduction(cfg: DictConfig) -> str:
    """``stage.ensemble_reduction`` (conf/stage/evaluate.yaml), checked."""
    reduction = cfg.stage.get("ensemble_reduction")
    if reduction is None:
        raise ValueError(
            f"stage.model=ensemble needs stage.ensemble_reduction (mean | median | max); stage={cfg.stage.name} "
            "sets none: run it with stage=evaluate stage.model=ensemble"
        )
    check_reduction(str(reduction))
    return str(reduction)


def resolve_model(cfg: DictConfig, spec: str) -> tuple[str, Path]:
    """(row label, checkpoint path) of a model spec; a missing checkpoint is refused with the command that makes it."""
    if spec == "merged":
        path, label = merged_path(cfg, cfg.merger), f"merged:{merger_name(cfg.merger)}"
        hint = f"{command('stage=merge')} (with the same merger overrides)"
    elif spec == "joint":
        if cfg.benchmark.get("joint") is None:
            raise ValueError(f"benchmark {cfg.benchmark.name} has no joint data config: it has no joint model")
        path, label = specialist_path(cfg, cfg.benchmark.joint.name), "joint"
        hint = command("stage=finetune", f"data={cfg.benchmark.joint.name}")
    elif spec.startswith("specialist:"):
        name = spec.split(":", 1)[1]
        path, label = specialist_path(cfg, name), spec
        hint = command("stage=finetune", f"data={name}")
    else:
        path, label = Path(spec), Path(spec).stem
        hint = "a detector checkpoint written by r2m_lab"
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint for model={spec!r} at {path}. Create it with: {hint}. Valid models: {MODELS_HELP}"
        )
    return label, path


def load_sets(cfg: DictConfig) -> tuple[FrameSet, dict[str, FrameSet], dict[str, list[str]]]:
    """The pooled validation set, every test set (``<protocol>/<name>``), and the protocol → test-set names map."""
    bench = cfg.benchmark
    val = FrameSet.concat(VALIDATION, [instantiate(d).frames("val") for d in bench.validation.values()])
    tests: dict[str, FrameSet] = {}
    protocols: dict[str, list[str]] = {}
    for protocol, sets in bench.protocols.items():
        protocols[protocol] = []
        for key, data_cfg in sets.items():
            name = f"{protocol}/{key}"
            tests[name] = instantiate(data_cfg).frames("test")
            protocols[protocol].append(name)
    return val, tests, protocols


def evaluate_models(
    cfg: DictConfig, checkpoints: Mapping[str, Path], ensemble: Sequence[str] = (), reduction: str = "mean"
) -> RunReport:
    """Score every checkpoint (and optionally the output ensemble of some of them, row ``ensemble``, last) on
    validation and every test set; return the report, rows in ``checkpoints`` order.

    Each frame is decoded once for all models and scored once per model even where test sets share frames. Scores
    are written to ``scores/<model>/<test set>.csv`` as each model finishes, so a crash keeps what was scored.
    """
    check_reduction(reduction)
    unknown = [m for m in ensemble if m not in checkpoints]
    if unknown:
        raise ValueError(f"ensemble members {unknown} are not among the evaluated models {list(checkpoints)}")
    out = output_dir(cfg)
    val, tests, protocols = load_sets(cfg)
    frames = {VALIDATION: val, **tests}
    sets = {name: ScoredSet.of(name, f) for name, f in frames.items()}
    test_sets = [n for names in protocols.values() for n in names]
    scorer = UniqueFrameScorer(frames, int(cfg.eval_batch_size), resolve_device(cfg))
    del frames, val, tests  # the report keeps labels only; the scorer holds the distinct frames
    log.info("Evaluating %d model(s) on %d unique frames (%d test sets)", len(checkpoints), len(scorer), len(sets) - 1)

    def loader(path: Path) -> Callable[[], tuple[Detector, dict[str, Any]]]:
        def load() -> tuple[Detector, dict[str, Any]]:
            model = load_detector(cfg, Checkpoint(path))
            return model, model_input_config(cfg, model)

        return load

    # Every model is run on the same decoded input batches (decoded once, not once per model).
    scored = scorer.score_models({label: loader(path) for label, path in checkpoints.items()})
    models: dict[str, ModelResult] = {}
    for label, scores in tqdm(scored, desc="evaluate", unit="model", total=len(checkpoints)):
        models[label] = ModelResult.from_scores(str(checkpoints[label]), scores, sets, test_sets)
        writers.write_scores(out, label, models[label], sets)
    if ensemble:
        # The output ensemble: mean (or median / max) P(fake) of the members, N× the inference cost of one model.
        scores = {n: combine([models[m].scores[n] for m in ensemble], reduction=reduction) for n in sets}
        source = f"{reduction} of " + ", ".join(ensemble)
        models["ensemble"] = ModelResult.from_scores(source, scores, sets, test_sets)
        writers.write_scores(out, "ensemble", models["ensemble"], sets)
    return RunReport(benchmark=str(cfg.benchmark.name), protocols=protocols, sets=sets, models=models)


def write_report(
    cfg: DictConfig, report: RunReport, title: str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Render ``report`` (with ``title`` and the ``extra`` metrics.json entries) into the run folder: metrics.json,
    CSV/LaTeX tables, results.md (also printed), heatmap and ROC PNGs, then the configured logger.

    Returns the metrics.json payload.
    """
    out = output_dir(cfg)
    report = report.with_context(title=title, extra=extra)
    writers.write_metrics_json(report, out)
    writers.write_table_csv(report, out)
    writers.write_table_latex(report, out)
    writers.write_heatmaps(report, out)
    writers.write_roc_curves(report, out)
    writers.write_markdown(report, out)
    print(writers.render_markdown(report))  # the run's final word: the table, for the person at the terminal
    log_report(cfg, report, out)
    return report.to_json()


def log_report(cfg: DictConfig, report: RunReport, out: Path) -> None:
    """Send the summary metrics, the table and the plots to the configured logger (W&B offline by default)."""
    logger = build_logger(cfg)
    if logger is None:
        return
    writers.log_to_logger(report, logger, out)
    close_logger(logger)
