"""stage=evaluate: score detectors on every protocol of the benchmark; metrics, score CSVs, ROC curves, heatmaps.

Thresholds are fitted on the benchmark's *validation* sets (EER point) and only applied to the test sets.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from r2m_lab.atomic import write_json_atomic, write_text_atomic
from r2m_lab.data.loaders import FrameDataset, build_transform, eval_loader
from r2m_lab.data.sources import FrameSet
from r2m_lab.detector import score_frames
from r2m_lab.evaluation import plots, tables
from r2m_lab.evaluation.metrics import evaluate_scores, fit_threshold, video_scores
from r2m_lab.stages.artifacts import merged_path, output_dir, specialist_names, specialist_path
from r2m_lab.stages.loggers import build_logger, close_logger
from r2m_lab.stages.merger_config import merger_name
from r2m_lab.stages.models import load_detector, model_input_config, resolve_device
from r2m_lab.weights import Checkpoint

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.stage.model`` (merged | joint | ensemble | specialist:<data> | a checkpoint path) on every
    protocol. ``merged`` follows ``merger``: ``merger=joint`` is the joint model, ``merger=ensemble`` the output
    ensemble of the benchmark's specialists (each scored, then combined per frame)."""
    return evaluate_model(cfg, str(cfg.stage.model))


def evaluate_model(
    cfg: DictConfig, spec: str, label: str | None = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluate one model spec (see :func:`evaluate`) and write the report; ``extra`` goes into metrics.json."""
    if spec == "ensemble":
        reduction = "mean"
        members = {f"specialist:{n}": resolve_model(cfg, f"specialist:{n}")[1] for n in specialist_names(cfg)}
        report = evaluate_models(cfg, members, ensemble=list(members), reduction=reduction)
        title = f"ensemble of {len(members)} specialists on {cfg.benchmark.name}"
        write_report(cfg, report, title=title, extra=extra)
        return report
    default_label, path = resolve_model(cfg, spec)
    label = label or default_label
    report = evaluate_models(cfg, {label: path})
    write_report(cfg, report, title=f"{label} on {cfg.benchmark.name}", extra=extra)
    return report


def resolve_model(cfg: DictConfig, spec: str) -> tuple[str, Path]:
    if spec == "merged":
        path, label = merged_path(cfg, cfg.merger), f"merged:{merger_name(cfg.merger)}"
        hint = "python -m r2m_lab stage=merge (with the same merger overrides)"
    elif spec == "joint":
        path, label = specialist_path(cfg, cfg.benchmark.joint.name), "joint"
        hint = f"python -m r2m_lab stage=finetune data={cfg.benchmark.joint.name}"
    elif spec.startswith("specialist:"):
        name = spec.split(":", 1)[1]
        path, label = specialist_path(cfg, name), spec
        hint = f"python -m r2m_lab stage=finetune data={name}"
    else:
        path, label = Path(spec), Path(spec).stem
        hint = "a detector checkpoint written by r2m_lab"
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint for model={spec!r} at {path}. Create it with: {hint}. "
            "Valid models: merged | joint | ensemble | specialist:<data name> | /path/to/checkpoint.safetensors"
        )
    return label, path


def load_sets(cfg: DictConfig) -> tuple[FrameSet, dict[str, FrameSet], dict[str, list[str]]]:
    """The pooled validation set, every test set (``<protocol>/<name>``), and the protocol → test-set names map."""
    bench = cfg.benchmark
    val = FrameSet.concat("validation", [instantiate(d).frames("val") for d in bench.validation.values()])
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
) -> dict[str, Any]:
    """Score every checkpoint (and optionally the ensemble of some of them) on validation and every test set.

    Each frame is scored once per model even where test sets share frames (the same real frames serve several
    test sets). Scores are written to ``scores/<model>/<test set>.csv`` as each model finishes.
    """
    out = output_dir(cfg)
    device = resolve_device(cfg)
    val, tests, protocols = load_sets(cfg)
    names = ["validation", *tests]
    pooled = FrameSet.concat("all", [val, *tests.values()])
    # (U,) first occurrence of each distinct frame, and (F,) where every pooled frame finds its score among the U
    _, first, inverse = np.unique(pooled.keys, return_index=True, return_inverse=True)
    unique = pooled.subset(first, "unique")
    offsets = np.cumsum([0] + [len(val)] + [len(s) for s in tests.values()])
    sets = {"validation": val, **tests}
    log.info("Evaluating %d model(s) on %d unique frames (%d test sets)", len(checkpoints), len(unique), len(tests))

    models: dict[str, dict[str, Any]] = {}
    kept: dict[str, dict[str, np.ndarray]] = {}
    loader = None
    for label, path in tqdm(checkpoints.items(), desc="evaluate", unit="model"):
        model = load_detector(cfg, Checkpoint(path))
        if loader is None:
            loader = eval_loader(
                FrameDataset(unique, build_transform(model_input_config(cfg, model))), int(cfg.eval_batch_size)
            )
        flat = score_frames(model, loader, device, desc=label)
        per_set = {n: flat[inverse[offsets[i] : offsets[i + 1]]] for i, n in enumerate(names)}
        models[label] = _metrics_for(label, per_set, sets, protocols, out, str(path))
        kept[label] = per_set  # (small: one float per frame) for the ensemble and the ROC plots
    if ensemble:
        # The output ensemble: mean (or median / max) P(fake) of the specialists, N× the inference cost of one model.
        per_set = {n: getattr(np, reduction)(np.stack([kept[m][n] for m in ensemble]), axis=0) for n in names}
        kept["ensemble"] = per_set
        source = f"{reduction} of " + ", ".join(ensemble)
        models["ensemble"] = _metrics_for("ensemble", per_set, sets, protocols, out, source)
    labels = {n: f.labels for n, f in sets.items()}
    return {
        "benchmark": str(cfg.benchmark.name),
        "protocols": protocols,
        "models": models,
        "_scores": kept,
        "_labels": labels,
    }


def _metrics_for(
    label: str,
    per_set: Mapping[str, np.ndarray],
    sets: Mapping[str, FrameSet],
    protocols: Mapping[str, Sequence[str]],
    out: Path,
    source: str,
) -> dict[str, Any]:
    val = sets["validation"]
    threshold = fit_threshold(per_set["validation"], val.labels, mode="eer")
    result = {
        "checkpoint": source,
        "threshold": threshold,
        "threshold_fitted_on": "validation (EER point)",
        "validation": evaluate_scores(per_set["validation"], val.labels, val.video_ids, threshold),
        "test": {},
    }
    for names in protocols.values():
        for name in names:
            frames = sets[name]
            result["test"][name] = evaluate_scores(per_set[name], frames.labels, frames.video_ids, threshold)
            _write_scores(out / "scores" / _safe(label) / f"{_safe(name)}.csv", frames, per_set[name])
    return result


def _summary_markdown(summary: Mapping[str, list[dict[str, Any]]], protocols: Mapping[str, Any]) -> str:
    """Model × protocol mean AUC, frame- and video-level side by side: the table a reader looks at first."""
    rows = []
    for frame_row, video_row in zip(summary["frame"], summary["video"], strict=True):
        row: dict[str, Any] = {"model": frame_row["model"]}
        for protocol in protocols:
            row[f"{protocol} (frame)"] = frame_row[f"{protocol} mean"]
            row[f"{protocol} (video)"] = video_row[f"{protocol} mean"]
        rows.append(row)
    return "## Mean AUC per protocol\n\n" + tables.to_markdown(rows)


def _safe(name: str) -> str:
    return name.replace("/", "__").replace(":", "-")


def _write_scores(path: Path, frames: FrameSet, scores: np.ndarray) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["frame", "video_id", "label", "score"])
    writer.writerows(
        zip(frames.keys.tolist(), frames.video_ids.tolist(), frames.labels.tolist(), scores.tolist(), strict=True)
    )
    write_text_atomic(path, buf.getvalue())
    v_scores, v_labels, v_ids = video_scores(scores, frames.labels, frames.video_ids)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["video_id", "label", "score"])
    writer.writerows(zip(list(v_ids), np.asarray(v_labels).tolist(), np.asarray(v_scores).tolist(), strict=True))
    write_text_atomic(path.with_name(path.stem + ".videos.csv"), buf.getvalue())


def write_report(
    cfg: DictConfig, report: dict[str, Any], title: str, extra: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """metrics.json, Markdown/CSV/LaTeX tables, ROC and heatmap PNGs in the run folder; the table is printed."""
    out = output_dir(cfg)
    # Per-frame arrays stay out of metrics.json (they are in scores/*.csv); they feed the ROC plots.
    scores = report.pop("_scores", {})
    labels = report.pop("_labels", {})
    report.update(extra or {})
    write_json_atomic(out / "metrics.json", report)
    results = {m: r["test"] for m, r in report["models"].items()}
    files: dict[str, str] = {"metrics": str(out / "metrics.json")}
    markdown = [f"# {title}", ""]
    summary: dict[str, list[dict[str, Any]]] = {}
    for level in ("frame", "video"):
        rows = tables.results_table(results, report["protocols"], metric="auc", level=level)
        tables.write_csv(rows, out / f"table_auc_{level}.csv")
        write_text_atomic(out / f"table_auc_{level}.tex", tables.to_latex(rows))
        summary[level] = rows
        test_names = [n for names in report["protocols"].values() for n in names]
        values = np.array([[results[m][n][level]["auc"] for n in test_names] for m in results])
        plots.plot_heatmap(
            list(results),
            test_names,
            values,
            out / "plots" / f"auc_{level}.png",
            f"{level}-level AUC",
            vmin=0.5,
            vmax=1.0,
        )
    markdown += [_summary_markdown(summary, report["protocols"]), ""]
    for protocol, names in report["protocols"].items():
        rows = [
            {"model": r["model"], **{n.split("/", 1)[1]: r[n] for n in names}, "mean": r[f"{protocol} mean"]}
            for r in summary["frame"]
        ]
        markdown += [f"## {protocol}: frame-level AUC per test set", "", tables.to_markdown(rows), ""]
    for name in (n for names in report["protocols"].values() for n in names):
        curves = {m: (s[name], labels[name]) for m, s in scores.items()}
        if curves:
            plots.plot_roc(curves, out / "plots" / f"roc_{_safe(name)}.png", f"ROC: {name}")
    if extra and "task_vector_cosines" in extra:
        tv = extra["task_vector_cosines"]
        markdown += ["## Task-vector cosines", "", tables.cosine_table(tv["names"], tv["matrix"]), ""]
        plots.plot_heatmap(
            tv["names"],
            tv["names"],
            np.array(tv["matrix"]),
            out / "plots" / "task_vector_cosines.png",
            "cosine(τᵢ, τⱼ)",
            vmin=-1.0,
            vmax=1.0,
        )
    if extra and "timings_seconds" in extra:
        spent = ", ".join(f"{k} {v:.0f} s" for k, v in extra["timings_seconds"].items())
        markdown += ["## Time", "", spent, ""]
    text = "\n".join(markdown)
    write_text_atomic(out / "results.md", text)
    files["table"] = str(out / "results.md")
    print(text)  # the run's final word: the table, for the person at the terminal
    log_report(cfg, report, out)
    return files


def log_report(cfg: DictConfig, report: Mapping[str, Any], out: Path) -> None:
    """Send the summary metrics, the table and the plots to the configured logger (W&B offline by default)."""
    logger = build_logger(cfg, name=f"{cfg.stage.name}-{cfg.benchmark.name}")
    if logger is None:
        return
    flat = {}
    for model, r in report["models"].items():
        for name, m in r["test"].items():
            flat[f"{model}/{name}/auc"] = m["frame"]["auc"]
    logger.log_metrics(flat)
    if type(logger).__name__ == "WandbLogger":
        rows = tables.results_table({m: r["test"] for m, r in report["models"].items()}, report["protocols"])
        columns = list(rows[0])
        logger.log_table(key="auc_frame", columns=columns, data=[[row[c] for c in columns] for row in rows])
        images = sorted((out / "plots").glob("*.png"))
        if images:
            logger.log_image(key="plots", images=[str(p) for p in images], caption=[p.stem for p in images])
    close_logger(logger)
