"""stage=expansion: add one forgery family at a time; re-merging (every merger) against joint retraining on the union.

The families join in ``stage.order`` (default: the benchmark's family order), starting from the first
``stage.start`` (default 2). At step n (n = start … K):

- the new family's specialist is fine-tuned from the same θ₀ (reused when its fingerprint matches; nothing already
  trained is retrained); at the first step, the ``start`` first specialists;
- every merger of ``stage.mergers`` (and every row of ``stage.variants``) re-merges the n specialists, choosing its
  scalar on the validation split of those n families only;
- the joint model is trained on the union of the n families' training data
  (:func:`~r2m_lab.stages.families.restrict_benchmark`'s joint; at n = K the benchmark's own joint model).

Every row of every step is scored in one evaluation on the full benchmark's test sets. Rows are labelled
``<row>@<n>`` (``r2m@3``, ``joint@3``) and carry ``step`` = n, ``added`` (the families added at that step), ``groups``:
``seen`` (in-distribution sets of the n families: what the old families lose), ``not_yet_added`` (in-distribution sets
of the families still to come), ``unseen`` (the benchmark's unseen protocol), ``cross`` / ``cross_not_yet_added``
(the other protocols' sets of those families), and ``cost_seconds``, the wall-clock of the step for that row: for a
merger row, the new specialists' ``train_seconds`` (from their cards, so reuse does not zero it) plus that merger's
selection (every grid merge and its validation scoring, from the card) or merge seconds; for the joint row, the
joint model's ``train_seconds``. ``cost_parts`` splits it. ``expansion.md`` holds the summary per step.

The single "add a family" step outside this table is stage=pipeline with one more family, e.g.
``python -m r2m_lab stage.families=[swap,reenact,synthesis] 'stage.reference_rows=[ensemble]'``: it fine-tunes only
the new specialist from the same θ₀ and re-merges it with the existing ones.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from r2m_lab.atomic import write_text_atomic
from r2m_lab.evaluation.report import RunReport
from r2m_lab.stages.artifacts import merged_path, output_dir, specialist_path
from r2m_lab.stages.base_model import ensure_base
from r2m_lab.stages.config_nodes import plain
from r2m_lab.stages.evaluate import evaluate_models, write_report
from r2m_lab.stages.families import family_keys, restrict_benchmark
from r2m_lab.stages.finetune import train_detector
from r2m_lab.stages.merge import SELECTION_SPLIT, open_specialists
from r2m_lab.stages.pipeline import JOINT, check_benchmark_data
from r2m_lab.stages.rows import merger_row, reference_row, theta0_entry
from r2m_lab.stages.scaling import UNSEEN, fmt_cell, group_means, merge_subset, plan_subsets, row_groups
from r2m_lab.stages.timing import stopwatch
from r2m_lab.weights import Checkpoint

log = logging.getLogger(__name__)

SEEN, NOT_YET = "seen", "not_yet_added"


def expansion_order(cfg: DictConfig) -> tuple[list[str], int]:
    """``stage.order`` (``benchmark``/null: the benchmark's family order, or a permutation of every family) and
    ``stage.start`` (2..K), checked."""
    keys = family_keys(cfg)
    value = plain(cfg.stage.get("order"))
    if value is None or value == "benchmark":
        order = list(keys)
    elif isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"stage.order must be `benchmark` or a list of every family {keys}, got {value!r}")
    else:
        order = [str(v) for v in value]
        unknown = sorted(set(order) - set(keys))
        missing = [k for k in keys if k not in order]
        if unknown or missing or len(set(order)) != len(order):
            raise ValueError(
                f"stage.order must list every family of benchmark {cfg.benchmark.name} once ({keys}); "
                f"got {order}"
                + (f", unknown {unknown}" if unknown else "")
                + (f", missing {missing}" if missing else "")
            )
    start = int(cfg.stage.start)
    if not 2 <= start <= len(keys):
        raise ValueError(f"stage.start={start} must be in 2..{len(keys)} (a merge needs two families; K = {len(keys)})")
    return order, start


def expansion(cfg: DictConfig) -> dict[str, Any]:
    """Run the expansion table (see the module docstring); return the metrics.json payload."""
    reuse = bool(cfg.stage.reuse)
    split = str(cfg.stage.get("select_split", SELECTION_SPLIT))
    group = output_dir(cfg).name
    timings: dict[str, float] = {}
    timed = stopwatch(timings)

    order, start = expansion_order(cfg)
    if cfg.benchmark.get("joint") is None:
        raise ValueError(
            f"benchmark {cfg.benchmark.name} has no joint data config: expansion compares with joint retraining"
        )
    steps = {n: order[:n] for n in range(start, len(order) + 1)}  # step → the families merged so far (in `order`)
    plans = plan_subsets(cfg, list(steps.values()))
    row_groups(cfg, order)  # a benchmark without per-family in-distribution sets is refused before training
    check_benchmark_data(cfg, dataclasses.replace(plans[tuple(order)], reference_rows=[JOINT]))
    log.info("expansion: order %s, steps %s", order, list(steps))

    timed("base", ensure_base, cfg)
    checkpoints: dict[str, Path] = {}
    rows: dict[str, dict[str, Any]] = {}
    merges: dict[str, dict[str, Any]] = {}
    base = None
    trained: list[str] = []
    for n, families in tqdm(steps.items(), desc="expansion steps", unit="step"):
        added = [f for f in families if f not in trained]
        train_seconds = {}
        for key in added:
            card = timed(
                f"finetune/{key}", train_detector, cfg, cfg.benchmark.specialists[key], "specialist", reuse, group
            )
            train_seconds[key] = float(card["train_seconds"])
        trained += added
        sub = restrict_benchmark(cfg, families)
        base, _ = open_specialists(sub)  # the n specialists share this θ₀, or the run stops here
        joint_card = timed(f"finetune/joint@{n}", train_detector, sub, sub.benchmark.joint, "joint", reuse, group)
        joint_path = specialist_path(sub, str(sub.benchmark.joint.name))
        if Checkpoint(joint_path).base_hash != base.base_hash:
            raise ValueError(f"the joint model {joint_path} was not fine-tuned from θ₀ {base.path.name}")
        groups = row_groups(cfg, families, inside=SEEN, outside=NOT_YET)
        kept = list(families)  # in the order they were added
        plan = plans[tuple(families)]
        cards = timed(f"merge@{n}", merge_subset, sub, plan, split, reuse, str(n))
        step = {"step": n, "added": added, "groups": groups}
        for name, (card, wall) in cards.items():
            selection = card.get("selection") or {}
            if selection:
                # the whole grid (merges + validation scoring); a card written before selections were timed gives
                # this call's wall-clock, which is the reuse time when the selection was reused
                merge_cost = selection.get("seconds")
                if merge_cost is None:
                    log.warning("%s@%d: its card has no selection seconds; counting this call's %.2f s", name, n, wall)
                    merge_cost = wall
            else:
                merge_cost = card["merge_seconds"]
            label = f"{name}@{n}"
            rows[label] = merger_row(card, kept, variant=name if name in plan.variants else None, **step)
            rows[label].update(
                row=name,
                cost_seconds=round(sum(train_seconds.values()) + float(merge_cost), 3),
                cost_parts={"train_seconds": train_seconds, "merge_seconds": float(merge_cost)},
            )
            checkpoints[label] = Path(card.get("checkpoint_path", merged_path(sub, plan.mergers[name])))
            merges[label] = {k: card[k] for k in ("hparams", "merge_seconds", "selection") if k in card}
        label = f"{JOINT}@{n}"
        rows[label] = {**reference_row(kept), **step, "row": JOINT, "data": str(sub.benchmark.joint.name)}
        rows[label]["cost_seconds"] = float(joint_card["train_seconds"])
        rows[label]["cost_parts"] = {"train_seconds": {JOINT: float(joint_card["train_seconds"])}}
        checkpoints[label] = joint_path

    report = timed("evaluate", evaluate_models, cfg, checkpoints)  # the full benchmark's sets, each model once
    report = report.reordered(checkpoints)
    summary = expansion_markdown(report, rows)
    extra = {
        "stage": "expansion",
        "backbone": str(cfg.backbone.name),
        "seed": int(cfg.seed),
        "theta0": theta0_entry(base),
        "families": family_keys(cfg),
        "order": order,
        "steps": {str(n): families for n, families in steps.items()},
        "rows": {label: rows[label] for label in report.models},
        "merges": merges,
        "timings_seconds": timings,
        "config": plain(cfg),
    }
    metrics = write_report(cfg, report, title=f"{cfg.benchmark.name}: adding one family at a time", extra=extra)
    write_text_atomic(output_dir(cfg) / "expansion.md", summary)
    print(summary)  # the run's final word beside the table write_report printed
    log.info("Timings (s): %s", timings)
    return metrics


def expansion_markdown(report: RunReport, rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown table: per step and row, the mean AUC on the families seen so far, on those not yet added and on
    the unseen ones, and the step's cost in seconds."""
    lines = [
        "# Dynamic expansion: re-merging against joint retraining",
        "",
        "Frame-level AUC averaged over each group's test sets; cost = the step's wall-clock for that row (new "
        "specialists' training + the merger's selection/merge, or the joint model's training).",
        "",
        "| step | added | row | seen | not yet added | unseen | cost s |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        means = group_means(report, label, row["groups"])
        lines.append(
            f"| {row['step']} | {'+'.join(row['added'])} | {row['row']} | {fmt_cell(means.get(SEEN))} | "
            f"{fmt_cell(means.get(NOT_YET))} | {fmt_cell(means.get(UNSEEN))} | {fmt_cell(row['cost_seconds'], 2)} |"
        )
    return "\n".join(lines) + "\n"
