"""stage=analyze: why a merge works or fails. Runs `r2m_lab.analysis` on θ₀, specialists and merged checkpoints
and writes ``analysis.json`` (every number) and ``analysis/*.png`` (the figures) into the run folder.

Which checkpoints: θ₀ (``stage.base``, default this recipe's), the specialists (``stage.specialists``: default the
benchmark's, else ``{family key: path}``; each is evaluated on its family's data) and the merged models
(``stage.merged``: ``merged`` = the merge of the ``merger`` config, made first when it is missing and
``train_missing`` is set, or paths). All must descend from θ₀ (``base_hash``), or the stage refuses them by name
before any work. Every AUC and feature statistic is computed on ``stage.split`` of each family's data (default the
validation split), recorded in the output.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from r2m_lab.analysis import curves as curve_lib
from r2m_lab.analysis import directions as direction_lib
from r2m_lab.analysis import features as feature_lib
from r2m_lab.analysis import figures, spectra
from r2m_lab.analysis.auc import auc_or_none, one_class_note
from r2m_lab.analysis.interference import layer_interference
from r2m_lab.analysis.lineage import check_same_base
from r2m_lab.atomic import write_json_atomic
from r2m_lab.data.loaders import FrameDataset, build_transform, eval_loader
from r2m_lab.data.sources import SPLITS, FrameSet
from r2m_lab.evaluation.scoring import UniqueFrameScorer
from r2m_lab.mergers import build_merger, load_merger_config
from r2m_lab.mergers.r2m import R2M, components
from r2m_lab.stages.artifacts import command, merged_path, output_dir
from r2m_lab.stages.base_model import require_base
from r2m_lab.stages.config_nodes import plain
from r2m_lab.stages.merger_config import merger_name, n_specialists
from r2m_lab.stages.models import detector_from_state, model_input_config, resolve_device
from r2m_lab.weights import Checkpoint

log = logging.getLogger(__name__)

PARTS = ("spectra", "similarity", "directions", "curves", "interference")
POOLED = "pooled"


# --------------------------------------------------------------------------------------------------- the inputs


def analysis_parts(cfg: DictConfig) -> list[str]:
    """``stage.parts``, checked: a non-empty list from `PARTS`, each once."""
    parts = plain(cfg.stage.get("parts"))
    if isinstance(parts, str) or not isinstance(parts, list) or not parts:
        raise ValueError(f"stage.parts must be a non-empty list from {list(PARTS)}, got {parts!r}")
    unknown = [p for p in parts if p not in PARTS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"stage.parts must list each of {list(PARTS)} at most once, got {parts}")
    return [str(p) for p in parts]


def analysis_split(cfg: DictConfig) -> str:
    split = str(cfg.stage.get("split", "val"))
    if split not in SPLITS or split == "train":
        raise ValueError(f"stage.split must be val or test (the frames the analysis looks at), got {split!r}")
    return split


def r2m_knobs(cfg: DictConfig) -> R2M:
    """The R²M decomposition's knobs: the run's ``merger`` if it is r2m, else conf/merger/r2m.yaml, with
    ``stage.r2m`` overrides; checked with N = the number of specialists."""
    overrides = plain(cfg.stage.get("r2m")) or {}
    if merger_name(cfg.merger) == "r2m":
        node = plain(OmegaConf.merge(OmegaConf.create(plain(cfg.merger)), OmegaConf.create(overrides)))
    else:
        node = load_merger_config("r2m", root=cfg, **overrides)
    merger = build_merger(node, n_tasks=n_specialists(cfg))
    if not isinstance(merger, R2M):
        raise ValueError(f"stage.r2m must configure R²M, got {type(merger).__name__}")
    return merger


def open_base(cfg: DictConfig, device: str) -> Checkpoint:
    path = cfg.stage.get("base")
    return Checkpoint(Path(str(path)).expanduser(), device=device) if path else require_base(cfg, device)


def open_specialists(cfg: DictConfig, device: str) -> dict[str, Checkpoint]:
    """{family key: specialist checkpoint}: the benchmark's (trained first when missing and ``train_missing``), or
    ``stage.specialists``; a family the benchmark does not have is refused (its data is what the specialist is
    scored on)."""
    given = plain(cfg.stage.get("specialists"))
    families = list(cfg.benchmark.specialists)
    if not given:
        from r2m_lab.stages.merge import open_specialists as open_benchmark_specialists

        _, by_name = open_benchmark_specialists(cfg, device=device)  # trains or names what is missing
        return {key: by_name[str(data.name)] for key, data in cfg.benchmark.specialists.items()}
    if not isinstance(given, Mapping):
        raise ValueError(f"stage.specialists must be null or {{family key: checkpoint path}}, got {given!r}")
    unknown = sorted(set(given) - set(families))
    if unknown:
        raise ValueError(f"stage.specialists names families {unknown}; benchmark {cfg.benchmark.name} has {families}")
    if len(given) < 2:
        raise ValueError(f"the analysis compares at least two specialists, stage.specialists gives {len(given)}")
    return {str(key): Checkpoint(Path(str(path)).expanduser(), device=device) for key, path in given.items()}


def open_merged(cfg: DictConfig, device: str) -> dict[str, Checkpoint]:
    """{label: merged checkpoint} from ``stage.merged``; ``merged`` is the merge of ``merger``, made when missing
    and ``train_missing`` is set, otherwise refused with the command that makes it."""
    specs = plain(cfg.stage.get("merged"))
    if isinstance(specs, str) or not isinstance(specs, list) or not specs:
        raise ValueError(f"stage.merged must be a non-empty list (merged | /path/to/checkpoint), got {specs!r}")
    out: dict[str, Checkpoint] = {}
    for spec in map(str, specs):
        if spec == "merged":
            label, path = f"merged:{merger_name(cfg.merger)}", merged_path(cfg, cfg.merger)
            if not path.is_file() and cfg.get("train_missing", False):
                from r2m_lab.stages.merge import merge_specialists

                log.info("No %s merge at %s: merging first (train_missing=true)", merger_name(cfg.merger), path)
                merge_specialists(cfg, cfg.merger)
            if not path.is_file():
                raise FileNotFoundError(
                    f"No merged checkpoint of merger={merger_name(cfg.merger)} at {path}. Create it with: "
                    f"{command('stage=merge')} (with the same merger overrides), or add train_missing=true"
                )
        else:
            path = Path(spec).expanduser()
            label = f"merged:{path.stem}"
        if label in out:
            raise ValueError(f"stage.merged lists {label} twice")
        out[label] = Checkpoint(path, device=device)
    return out


def family_frames(cfg: DictConfig, families: list[str], split: str) -> dict[str, FrameSet]:
    return {family: instantiate(cfg.benchmark.specialists[family]).frames(split) for family in families}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


# ------------------------------------------------------------------------------------------------------ scoring


class FamilyScorer:
    """AUC per family (and pooled over the families) of a (backbone, head) pair, on the analysis split.

    One `UniqueFrameScorer` over all families (``pooled`` and `curves`) and one per family (`interference` scores a
    specialist on its own family only).
    """

    def __init__(self, cfg: DictConfig, frames: Mapping[str, FrameSet], device: torch.device) -> None:
        self.cfg, self.frames, self.device = cfg, frames, device
        batch = int(cfg.eval_batch_size)
        self.all = UniqueFrameScorer(frames, batch, device)
        self.each = {family: UniqueFrameScorer({family: f}, batch, device) for family, f in frames.items()}
        self.pooled_labels = np.concatenate([f.labels for f in frames.values()])

    def _model(self, backbone: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> Any:
        model = detector_from_state(self.cfg, backbone, head)
        return model, model_input_config(self.cfg, model)

    def by_family(self, backbone: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> dict:
        model, input_cfg = self._model(backbone, head)
        scores = self.all(model, input_cfg)
        out = {family: auc_or_none(scores[family], self.frames[family].labels) for family in self.frames}
        out[POOLED] = auc_or_none(np.concatenate([scores[f] for f in self.frames]), self.pooled_labels)
        return out

    def one_family(self, family: str, backbone: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]):
        model, input_cfg = self._model(backbone, head)
        return auc_or_none(self.each[family](model, input_cfg)[family], self.frames[family].labels)


# -------------------------------------------------------------------------------------------------------- stage


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured analyses; write ``analysis.json`` and the figures; return the JSON payload."""
    parts = analysis_parts(cfg)
    split = analysis_split(cfg)
    knobs = r2m_knobs(cfg) if {"spectra", "curves"} & set(parts) else None
    etas = curve_lib.check_grid("stage.eta_grid", plain(cfg.stage.eta_grid))
    lams = curve_lib.check_grid("stage.lambda_grid", plain(cfg.stage.lambda_grid))
    top = int(cfg.stage.get("top_singular_values", 32))
    if top < 1:
        raise ValueError(f"stage.top_singular_values must be ≥ 1, got {top}")
    device = resolve_device(cfg)

    specialists = open_specialists(cfg, str(device))  # first: with train_missing it trains θ₀ too
    base = open_base(cfg, str(device))
    merged = open_merged(cfg, str(device))
    check_same_base(base, {**{f"specialist:{f}": c for f, c in specialists.items()}, **merged})
    families = list(specialists)
    frames = family_frames(cfg, families, split)
    notes = [note for f in families if (note := one_class_note(f, frames[f].labels, split))]
    for note in notes:
        log.warning(note)

    out_dir = output_dir(cfg)
    fig_dir = out_dir / "analysis"
    theta0 = base.backbone
    thetas = {f: c.backbone for f, c in specialists.items()}
    heads = {f: c.head for f, c in specialists.items()}
    merged_states = {label: c.backbone_state() for label, c in merged.items()}
    result: dict[str, Any] = {
        "stage": "analyze",
        "split": split,
        "benchmark": str(cfg.benchmark.name),
        "backbone": str(cfg.backbone.name),
        "seed": int(cfg.seed),
        "theta0": {"path": str(base.path), "base_hash": base.base_hash},
        "specialists": {f: str(c.path) for f, c in specialists.items()},
        "merged": {label: str(c.path) for label, c in merged.items()},
        "frames": {f: {"real": frames[f].n_real, "fake": frames[f].n_fake} for f in families},
        "parts": parts,
        "notes": notes,
        "figures": {},
    }
    figs = result["figures"]

    comps = None
    if knobs is not None:
        comps = components(theta0, thetas, knobs, spectra="spectra" in parts)
        result["r2m"] = {"hyperparameters": comps.diagnostics["hyperparameters"], "eta": comps.eta}
    if "spectra" in parts:
        report = spectra.spectra_report(theta0, thetas, comps, merged_states, top)
        result["spectra"] = report
        figs["spectrum"] = str(figures.plot_spectrum(report["gram"], report["real_subspace"], fig_dir / "spectrum.png"))
        figs["block_energy"] = str(figures.plot_block_energy(report["blocks"], fig_dir / "block_energy.png"))
        order = spectra.matrix_labels(report["residual_spectra"])
        figs["residual_spectra"] = str(
            figures.plot_residual_spectra(report["residual_spectra"], order, fig_dir / "residual_spectra.png")
        )

    if {"similarity", "directions"} & set(parts):
        result.update(_feature_parts(cfg, parts, specialists, merged, frames, device, split, fig_dir, figs))

    if "curves" in parts or "interference" in parts:
        scorer = FamilyScorer(cfg, frames, device)
        if "curves" in parts:
            curves = curve_lib.interpolation_curves(theta0, thetas, heads, comps, etas, lams, scorer.by_family)
            result["curves"] = {"split": split, "metric": "frame-level AUC", **curves}
            figs["curves"] = str(figures.plot_interpolation(curves, fig_dir / "curves.png", split))
        if "interference" in parts:
            result["interference"] = {}
            for label, checkpoint in tqdm(merged.items(), desc="interference", unit="merged model"):
                report = layer_interference(
                    thetas, heads, merged_states[label], checkpoint.head, scorer.one_family, desc=label
                )
                result["interference"][label] = {"split": split, **report}
                path = fig_dir / f"interference_{_slug(label)}.png"
                title = f"AUC change ({split}): one layer group from {label}, the rest the specialist's"
                figs[f"interference/{label}"] = str(figures.plot_interference(report, path, title))

    write_json_atomic(out_dir / "analysis.json", result)
    log.info(
        "Analysis of %d specialists and %d merged model(s) on the %s split: %s",
        len(families),
        len(merged),
        split,
        out_dir / "analysis.json",
    )
    return result


def _feature_parts(
    cfg: DictConfig,
    parts: list[str],
    specialists: Mapping[str, Checkpoint],
    merged: Mapping[str, Checkpoint],
    frames: Mapping[str, FrameSet],
    device: torch.device,
    split: str,
    fig_dir: Path,
    figs: dict[str, str],
) -> dict[str, Any]:
    """Similarity and directions from one streamed pass per family through every specialist and merged model."""
    from r2m_lab.stages.models import load_detector

    models = {f"specialist:{f}": load_detector(cfg, c) for f, c in specialists.items()}
    models.update({label: load_detector(cfg, c) for label, c in merged.items()})
    heads = {label: {k: v.detach() for k, v in m.head.state_dict().items()} for label, m in models.items()}
    input_cfg = model_input_config(cfg, next(iter(models.values())))
    backbones = {label: m.backbone for label, m in models.items()}
    pairs = [(f"specialist:{f}", label) for f in specialists for label in merged]
    similarity, means = {}, {}
    for family, family_set in tqdm(frames.items(), desc="features", unit="family"):
        _, first = np.unique(family_set.keys, return_index=True)
        distinct = family_set.subset(np.sort(first), f"{family}/distinct")
        loader = eval_loader(FrameDataset(distinct, build_transform(input_cfg)), int(cfg.eval_batch_size))
        batches = ((x, y) for x, y, _ in loader)
        stats = feature_lib.collect(backbones, pairs, batches, device, desc=family)
        similarity[family] = stats.similarity()
        means[family] = stats.means
    out: dict[str, Any] = {}
    if "similarity" in parts:
        out["similarity"] = {"split": split, "families": similarity}
        for metric, name in (("cka", "linear CKA"), ("mean_cosine", "mean cosine")):
            path = fig_dir / f"similarity_{metric}.png"
            title = f"{name} of pooled features, specialist vs merged ({split} split)"
            figs[f"similarity_{metric}"] = str(figures.plot_similarity(similarity, metric, path, title))
    if "directions" in parts:
        report = direction_lib.direction_report(means, pairs, heads)
        alignment = direction_lib.head_alignment(heads)
        out["directions"] = {"split": split, **report, "heads": alignment}
        title = f"angle between μ_fake − μ_real of specialist and merged features (°, {split} split)"
        figs["directions"] = str(figures.plot_directions(report, fig_dir / "directions.png", title))
        title = "cosine of head directions W[fake] − W[real]"
        figs["head_alignment"] = str(figures.plot_head_alignment(alignment, fig_dir / "head_alignment.png", title))
    return out
