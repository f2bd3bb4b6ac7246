"""Writers of a :class:`~r2m_lab.evaluation.report.RunReport`: each renders the report into one kind of output.

========================  ======================================================================================
``write_metrics_json``    ``metrics.json``: :meth:`RunReport.to_json`
``write_scores``          ``scores/<model>/<test set>.csv`` and ``.videos.csv`` of one row (written as it is scored)
``write_table_csv``       ``table_auc_{frame,video}.csv``: model × test-set AUC with protocol means
``write_table_latex``     ``table_auc_{frame,video}.tex``: the same tables as LaTeX ``tabular``
``render_markdown``       the Markdown summary (``write_markdown`` writes it to ``results.md``)
``write_heatmaps``        ``plots/auc_{frame,video}.png`` (+ ``plots/task_vector_cosines.png`` when recorded)
``write_roc_curves``      ``plots/roc_<test set>.png``: every model's ROC curve on that set
``log_to_logger``         the frame AUCs, the table and the plots to a Lightning logger (W&B or CSV)
========================  ======================================================================================

Every file is written atomically; ``out`` is the run folder. Model and set names become file names through
:func:`safe_name` (``/`` → ``__``, ``:`` → ``-``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from r2m_lab.atomic import write_json_atomic, write_text_atomic
from r2m_lab.evaluation import plots, tables
from r2m_lab.evaluation.metrics import video_scores
from r2m_lab.evaluation.report import ModelResult, RunReport, ScoredSet

LEVELS = ("frame", "video")


def safe_name(name: str) -> str:
    """A model or set name as a file name: ``in_distribution/swap`` → ``in_distribution__swap``."""
    return name.replace("/", "__").replace(":", "-")


def write_metrics_json(report: RunReport, out: Path) -> Path:
    """``metrics.json`` (indented, key-sorted)."""
    return write_json_atomic(out / "metrics.json", report.to_json())


def write_scores(out: Path, label: str, result: ModelResult, sets: dict[str, ScoredSet]) -> list[Path]:
    """Per-frame (``frame, video_id, label, score``) and per-video (``video_id, label, score``, mean of the frames)
    CSVs of one row on each of its test sets."""
    written = []
    for name in result.test:
        frames, scores = sets[name], result.scores[name]
        path = out / "scores" / safe_name(label) / f"{safe_name(name)}.csv"
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["frame", "video_id", "label", "score"])
        writer.writerows(
            zip(frames.keys.tolist(), frames.video_ids.tolist(), frames.labels.tolist(), scores.tolist(), strict=True)
        )
        written.append(write_text_atomic(path, buf.getvalue()))
        v_scores, v_labels, v_ids = video_scores(scores, frames.labels, frames.video_ids)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["video_id", "label", "score"])
        writer.writerows(zip(list(v_ids), np.asarray(v_labels).tolist(), np.asarray(v_scores).tolist(), strict=True))
        written.append(write_text_atomic(path.with_name(path.stem + ".videos.csv"), buf.getvalue()))
    return written


def auc_rows(report: RunReport, level: str) -> list[dict[str, Any]]:
    """The model × test-set AUC rows at ``level`` with one ``<protocol> mean`` column per protocol."""
    return tables.results_table(report.test_results(), report.protocols, metric="auc", level=level)


def write_table_csv(report: RunReport, out: Path) -> list[Path]:
    """``table_auc_frame.csv`` and ``table_auc_video.csv``."""
    return [tables.write_csv(auc_rows(report, level), out / f"table_auc_{level}.csv") for level in LEVELS]


def write_table_latex(report: RunReport, out: Path) -> list[Path]:
    """``table_auc_frame.tex`` and ``table_auc_video.tex`` (best value per column in bold)."""
    return [
        write_text_atomic(out / f"table_auc_{level}.tex", tables.to_latex(auc_rows(report, level))) for level in LEVELS
    ]


def render_markdown(report: RunReport) -> str:
    """The title, mean AUC per protocol (frame and video side by side), frame AUC per test set for each protocol,
    then the task-vector cosines and the timings when the run recorded them."""
    frame, video = auc_rows(report, "frame"), auc_rows(report, "video")
    summary = []
    for frame_row, video_row in zip(frame, video, strict=True):
        row: dict[str, Any] = {"model": frame_row["model"]}
        for protocol in report.protocols:
            row[f"{protocol} (frame)"] = frame_row[f"{protocol} mean"]
            row[f"{protocol} (video)"] = video_row[f"{protocol} mean"]
        summary.append(row)
    lines = [f"# {report.title}", "", "## Mean AUC per protocol\n\n" + tables.to_markdown(summary), ""]
    for protocol, names in report.protocols.items():
        rows = [
            {"model": r["model"], **{n.split("/", 1)[1]: r[n] for n in names}, "mean": r[f"{protocol} mean"]}
            for r in frame
        ]
        lines += [f"## {protocol}: frame-level AUC per test set", "", tables.to_markdown(rows), ""]
    cosines = report.task_vector_cosines
    if cosines is not None:
        lines += ["## Task-vector cosines", "", tables.cosine_table(cosines.names, cosines.matrix), ""]
    timings = report.timings_seconds
    if timings is not None:
        lines += ["## Time", "", ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), ""]
    return "\n".join(lines)


def write_markdown(report: RunReport, out: Path) -> Path:
    """``results.md``: :func:`render_markdown`."""
    return write_text_atomic(out / "results.md", render_markdown(report))


def write_heatmaps(report: RunReport, out: Path) -> list[Path]:
    """Model × test-set AUC heatmaps per level (colour scale 0.5-1), and the task-vector cosines (-1-1) if any."""
    written = [
        plots.plot_heatmap(
            list(report.models),
            report.test_sets,
            report.auc_matrix(level),
            out / "plots" / f"auc_{level}.png",
            f"{level}-level AUC",
            vmin=0.5,
            vmax=1.0,
        )
        for level in LEVELS
    ]
    cosines = report.task_vector_cosines
    if cosines is not None:
        written.append(
            plots.plot_heatmap(
                cosines.names,
                cosines.names,
                np.array(cosines.matrix),
                out / "plots" / "task_vector_cosines.png",
                "cosine(τᵢ, τⱼ)",
                vmin=-1.0,
                vmax=1.0,
            )
        )
    return written


def write_roc_curves(report: RunReport, out: Path) -> list[Path]:
    """One ROC figure per test set with every model's curve (frame level)."""
    if not report.models:
        return []
    return [
        plots.plot_roc(
            {label: (r.scores[name], report.sets[name].labels) for label, r in report.models.items()},
            out / "plots" / f"roc_{safe_name(name)}.png",
            f"ROC: {name}",
        )
        for name in report.test_sets
    ]


def log_to_logger(report: RunReport, logger: Any, out: Path) -> None:
    """``<model>/<test set>/auc`` (frame level) as metrics; with W&B also the frame AUC table and every PNG under
    ``out/plots``. The caller builds and closes the logger."""
    logger.log_metrics(
        {f"{label}/{name}/auc": m["frame"]["auc"] for label, r in report.models.items() for name, m in r.test.items()}
    )
    if type(logger).__name__ == "WandbLogger":
        rows = auc_rows(report, "frame")
        columns = list(rows[0])
        logger.log_table(key="auc_frame", columns=columns, data=[[row[c] for c in columns] for row in rows])
        images = sorted((out / "plots").glob("*.png"))
        if images:
            logger.log_image(key="plots", images=[str(p) for p in images], caption=[p.stem for p in images])
