"""stage=merge: merge the benchmark's specialists with the configured merger, streaming from their safetensors.

With ``stage.select`` (a grid, e.g. ``stage.select={lam:[0.1,0.3,0.5,1.0]}``) the merger's scalar(s) are chosen by
frame-level AUC on the pooled in-distribution *validation* split first; the curve is recorded in the card, in
``metrics.json`` and as ``plots/selection_<merger>.png``. Selecting on any other split is refused.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from r2m_lab.atomic import write_json_atomic
from r2m_lab.data.sources import FrameSet
from r2m_lab.evaluation import plots
from r2m_lab.evaluation.metrics import frame_metrics
from r2m_lab.evaluation.scoring import UniqueFrameScorer
from r2m_lab.mergers import MergeResult
from r2m_lab.stages.artifacts import merged_path, output_dir, specialist_names, specialist_path
from r2m_lab.stages.base_model import require_base
from r2m_lab.stages.config_nodes import fingerprint, plain
from r2m_lab.stages.merger_config import build_run_merger, merger_hparams, merger_name, validate_merger
from r2m_lab.stages.models import detector_from_state, model_input_config, resolve_device
from r2m_lab.stages.screen import screen, screen_mode
from r2m_lab.stages.specialists import ensure_specialists
from r2m_lab.weights import Checkpoint, provenance, save_detector, write_card

log = logging.getLogger(__name__)

SELECTION_SPLIT = "val"  # the only split hyper-parameters may be chosen on (merging.md)


def merge(cfg: DictConfig) -> dict[str, Any]:
    """Merge with ``cfg.merger`` (choosing its scalars on validation if ``stage.select`` is set); write the merged
    detector + card to its stable path and the card as this run's ``metrics.json``."""
    select = plain(cfg.stage.get("select")) or {}
    validate_merger(cfg, cfg.merger)  # bad knobs and a bad stage.screen fail before any checkpoint is read
    screening = None
    if screen_mode(cfg) != "off":  # off: no pass, and the checkpoints are opened once, by the merge below
        screening = screen(cfg, *open_specialists(cfg, device=str(resolve_device(cfg))))
    if select:
        card = select_and_merge(cfg, cfg.merger, select, split=str(cfg.stage.get("select_split", SELECTION_SPLIT)))
    else:
        card = merge_specialists(cfg, cfg.merger)
    if screening is not None:
        card = {**card, "screening": screening}
    if cfg.stage.get("evaluate"):
        # metrics.json then holds the evaluation on every protocol with the merge card beside it, so a sweep's run
        # folders feed the table builder directly.
        from r2m_lab.stages.evaluate import evaluate_model

        return evaluate_model(cfg, card["checkpoint_path"], label=merger_name(cfg.merger), extra={"merge": card})
    write_json_atomic(output_dir(cfg) / "metrics.json", card)
    return card


def open_specialists(cfg: DictConfig, device: str = "cpu") -> tuple[Checkpoint, dict[str, Checkpoint]]:
    """θ₀ and the benchmark's specialists, refused unless every specialist descends from this θ₀."""
    ensure_specialists(cfg)  # trains what is missing (train_missing=true) or names the commands that would
    names = specialist_names(cfg)
    missing = [n for n in names if not specialist_path(cfg, n).is_file()]
    if missing:
        commands = "\n".join(f"  python -m r2m_lab stage=finetune data={n} seed={cfg.seed}" for n in missing)
        raise FileNotFoundError(
            f"{len(missing)} specialist(s) of benchmark {cfg.benchmark.name} were never trained for backbone "
            f"{cfg.backbone.name}, seed {cfg.seed} (looked in {specialist_path(cfg, missing[0]).parent}). "
            f"Train them first:\n{commands}"
        )
    base = require_base(cfg, device)
    specialists = {n: Checkpoint(specialist_path(cfg, n), device=device) for n in names}
    foreign = {n: c.base_hash[:12] or "none" for n, c in specialists.items() if c.base_hash != base.base_hash}
    if foreign:
        raise ValueError(
            f"Specialists {sorted(foreign)} were not fine-tuned from this θ₀ ({base.path.name}, hash "
            f"{base.base_hash[:12]}); their θ₀ hashes: {foreign}. Merging needs one shared θ₀: re-run "
            "stage=finetune for them with the current backbone config."
        )
    return base, specialists


def _run_merger(
    cfg: DictConfig, merger_cfg: Mapping[str, Any], base: Checkpoint, specialists: Mapping[str, Checkpoint]
) -> MergeResult:
    merger = build_run_merger(cfg, merger_cfg)
    return merger(
        base.backbone, {n: c.backbone for n, c in specialists.items()}, {n: c.head for n, c in specialists.items()}
    )


def merge_specialists(
    cfg: DictConfig,
    merger_cfg: Mapping[str, Any],
    reuse: bool = False,
    selection: Mapping[str, Any] | None = None,
    result: MergeResult | None = None,
) -> dict[str, Any]:
    """Run one merger over the benchmark's specialists (or save an already computed ``result``); return the card."""
    path = merged_path(cfg, merger_cfg)
    name = merger_name(merger_cfg)
    validate_merger(cfg, merger_cfg)  # bad knobs fail here, before any checkpoint is read
    base, specialists = open_specialists(cfg, device=str(resolve_device(cfg)))
    sources = {n: {"path": str(c.path), "hash_of_base": c.base_hash} for n, c in specialists.items()}
    if reuse and result is None and path.is_file():
        card = Checkpoint(path).card()
        if card.get("specialist_mtimes") == _mtimes(specialists):
            log.info("Reusing merged model %s", path)
            return card
    start = time.perf_counter()
    if result is None:
        result = _run_merger(cfg, merger_cfg, base, specialists)
    seconds = time.perf_counter() - start
    save_detector(path, result.backbone, result.head, {"kind": "merged", "base_hash": base.base_hash, "name": name})
    # Where the merged weights came from: each input file's bytes (sha256), not only its path.
    for family, checkpoint in specialists.items():
        sources[family]["source"] = provenance(checkpoint.path, "r2m_lab")
    card = write_card(
        path,
        {
            "kind": "merged",
            "name": name,
            "merger": name,
            "hparams": merger_hparams(merger_cfg),
            "backbone": str(cfg.backbone.name),
            "benchmark": str(cfg.benchmark.name),
            "base_hash": base.base_hash,
            "base_checkpoint": str(base.path),
            "base_source": provenance(base.path, "r2m_lab"),
            "specialists": sources,
            "specialist_mtimes": _mtimes(specialists),
            "seed": int(cfg.seed),
            "merge_seconds": round(result.diagnostics.get("timings_s", {}).get("total", seconds), 3),
            "diagnostics": plain(result.diagnostics),
            **({"selection": dict(selection)} if selection else {}),
            "checkpoint_path": str(path),
        },
    )
    log.info("Merged %d specialists with %s in %.2f s → %s", len(specialists), name, card["merge_seconds"], path)
    return card


def _mtimes(specialists: Mapping[str, Checkpoint]) -> dict[str, float]:
    # A re-trained specialist invalidates every merge made from its predecessor.
    return {n: Path(c.path).stat().st_mtime for n, c in specialists.items()}


# ------------------------------------------------------------------------------------------ validation selection
def selection_grid(select: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The grid points of ``{param: [values...]}``: the Cartesian product, in the order the values are listed."""
    params = list(select)
    values = []
    for param in params:
        vals = select[param]
        if isinstance(vals, str) or not isinstance(vals, Sequence) or not len(vals):
            raise ValueError(f"stage.select.{param} must be a non-empty list of values, got {vals!r}")
        values.append(list(vals))
    return [dict(zip(params, point, strict=True)) for point in itertools.product(*values)]


def validation_frames(cfg: DictConfig, split: str = SELECTION_SPLIT) -> FrameSet:
    """The pooled validation split of the benchmark's validation sets, refused unless they are in-distribution."""
    if split != SELECTION_SPLIT:
        raise ValueError(
            f"hyper-parameters are chosen on the in-distribution validation split only ({SELECTION_SPLIT!r}); "
            f"selecting on {split!r} would report a number tuned on its own test data"
        )
    allowed = set(specialist_names(cfg))
    sets = dict(cfg.benchmark.validation)
    foreign = sorted(str(d.name) for d in sets.values() if str(d.name) not in allowed)
    if foreign:
        raise ValueError(
            f"benchmark.validation lists {foreign}, which are not the specialists' own families {sorted(allowed)}: "
            "selection may only look at in-distribution validation data, never at cross-domain or unseen sets"
        )
    return FrameSet.concat("validation", [instantiate(d).frames(split) for d in sets.values()])


def validation_scorer(cfg: DictConfig, val: FrameSet | None = None) -> UniqueFrameScorer:
    """A scorer of the pooled validation frames (``{"validation": val}``, default :func:`validation_frames`): it
    keeps their decoded input batches, so every grid point of every selection it serves runs on one decode."""
    val = validation_frames(cfg) if val is None else val
    return UniqueFrameScorer({"validation": val}, int(cfg.eval_batch_size), resolve_device(cfg))


def plot_selection(cfg: DictConfig, name: str, selection: Mapping[str, Any]) -> Path:
    """``plots/selection_<merger>.png`` in this run's folder: validation AUC per grid point, the choice marked."""
    curve = selection["curve"]
    params = list(selection["grid"])
    labels = [", ".join(f"{k}={point[k]}" for k in params) for point in curve]
    best = next(i for i, point in enumerate(curve) if all(point[k] == selection["chosen"][k] for k in params))
    return plots.plot_selection(
        labels,
        [point["val_auc"] for point in curve],
        best,
        output_dir(cfg) / "plots" / f"selection_{name}.png",
        f"{name}: chosen on the validation split",
    )


def select_and_merge(
    cfg: DictConfig,
    merger_cfg: Mapping[str, Any],
    select: Mapping[str, Any],
    split: str = SELECTION_SPLIT,
    reuse: bool = False,
    label: str | None = None,
    scorer: UniqueFrameScorer | None = None,
) -> dict[str, Any]:
    """Merge at every grid point, keep the one with the best validation AUC (the first on ties), save it.

    Each point is merged in memory and scored on the pooled in-distribution validation frames; only the winner is
    written. The card's ``selection`` holds the grid, the curve and the choice. ``label`` names the selection plot
    (default: the merger's name; a run holding one merger twice passes its row labels). ``scorer``: a
    :func:`validation_scorer` to reuse (a run selecting several mergers decodes the validation frames once).
    """
    name = merger_name(merger_cfg)
    plot_name = label or name
    val = validation_frames(cfg, split)  # refuses other splits before any work
    unknown = sorted(set(select) - set(merger_hparams(merger_cfg)))
    if unknown:
        known = sorted(merger_hparams(merger_cfg))
        raise ValueError(f"merger={name} has no hyper-parameter(s) {unknown} to select; it has {known}")
    grid = selection_grid(select)
    # resolved first: a detached copy cannot resolve interpolations such as r2m's ${rank_ratio}
    points = [OmegaConf.merge(OmegaConf.create(plain(merger_cfg)), point) for point in grid]
    for point_cfg in points:
        validate_merger(cfg, point_cfg)  # the whole grid is checked before the first merge
    device = resolve_device(cfg)
    base, specialists = open_specialists(cfg, device=str(device))
    # A selection is a pure function of the merger config, the grid and the specialists: remember its winner.
    key = {"grid": select, "merger": merger_hparams(merger_cfg), "split": split, "specialists": _mtimes(specialists)}
    memo = merged_path(cfg, merger_cfg).with_name(f"{name}-selection-{fingerprint(key, 8)}.json")
    if reuse and memo.is_file():
        chosen_path = Path(json.loads(memo.read_text())["checkpoint"])
        if chosen_path.is_file() and Checkpoint(chosen_path).card().get("specialist_mtimes") == _mtimes(specialists):
            log.info("Reusing the validation selection of %s: %s", name, chosen_path)
            card = Checkpoint(chosen_path).card()
            card["selection"]["plot"] = str(plot_selection(cfg, plot_name, card["selection"]))  # this run's folder
            return card
    curve, best, best_result = [], -1, None
    start = time.perf_counter()  # the selection wall-clock: every grid merge and its validation scoring
    if scorer is None:
        scorer = validation_scorer(cfg, val)
    elif not np.array_equal(scorer.keys_of("validation"), val.keys):
        raise ValueError(f"select {name}: the scorer passed in was built on other frames than the {split} split")
    for i, (point, point_cfg) in enumerate(tqdm(list(zip(grid, points, strict=True)), desc=f"select {name}")):
        result = _run_merger(cfg, point_cfg, base, specialists)
        model = detector_from_state(cfg, result.backbone, result.head)
        scores = scorer(model, model_input_config(cfg, model))["validation"]  # (F,) in pooled order
        auc = frame_metrics(scores, val.labels)["auc"]
        curve.append({**point, "val_auc": auc})
        log.info("select %s %s: validation AUC %.4f", name, point, auc)
        if best < 0 or (np.isfinite(auc) and not auc <= curve[best]["val_auc"]):
            best, best_result = i, result
        del model
    chosen = grid[best]
    edges = [k for k, v in chosen.items() if len(select[k]) > 1 and v in (select[k][0], select[k][-1])]
    if edges:
        log.warning(
            "%s: the validation choice %s sits at the edge of its grid for %s; widen the grid", name, chosen, edges
        )
    selection = {
        "at_grid_edge": edges,
        "split": split,
        "sets": [str(d.name) for d in cfg.benchmark.validation.values()],
        "frames": len(val),
        "metric": "frame-level AUC",
        "grid": {k: list(v) for k, v in select.items()},
        "curve": curve,
        "chosen": chosen,
        "seconds": round(time.perf_counter() - start, 3),  # kept on reuse: stage=expansion's cost of a step
    }
    selection["plot"] = str(plot_selection(cfg, plot_name, selection))
    card = merge_specialists(cfg, points[best], reuse=reuse, selection=selection, result=best_result)
    write_json_atomic(memo, {"checkpoint": card["checkpoint_path"], "chosen": chosen})
    overrides = " ".join(f"merger.{k}={v}" for k, v in chosen.items())
    log.info(
        "%s: chose %s (validation AUC %.4f); evaluate it with: python -m r2m_lab stage=evaluate merger=%s %s",
        name,
        chosen,
        curve[best]["val_auc"],
        name,
        overrides,
    )
    return card
