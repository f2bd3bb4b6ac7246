"""Synthetic run folders for the table builder's tests, written exactly as the run contract says (metrics.json,
scores CSVs, .hydra/), and a real Hydra multirun of the real config (a no-op task, so it takes a second or two)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from r2m_lab.evaluation.metrics import evaluate_scores, video_scores
from r2m_lab.evaluation.writers import safe_name
from tests.conftest import CONF, REPO

PROTOCOLS = {"in_distribution": ["in_distribution/swap", "in_distribution/edit"], "unseen": ["unseen/grid"]}
VIDEOS = 12  # per test set: 6 real, 6 fake
FRAMES = 3  # per video

# A row's frame scores: f(labels (n,), video index (n,), set name, seed) -> scores (n,)
ScoreFn = Callable[[np.ndarray, np.ndarray, str, int], np.ndarray]


def noisy(strength: float, noise_seed: int = 0) -> ScoreFn:
    """Scores ``sigmoid(strength · label + noise)``: the noise depends on the set, frame and seed, not on the row,
    so two rows built with the same ``noise_seed`` differ only in their strength."""

    def fn(labels: np.ndarray, video: np.ndarray, test_set: str, seed: int) -> np.ndarray:
        rng = np.random.default_rng([noise_seed, seed, sum(map(ord, test_set))])
        logits = strength * labels + rng.normal(size=labels.size)
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32).astype(np.float64)  # P(fake) as runs store it

    return fn


def set_frames(test_set: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(frame keys, labels, video index, video ids) of a synthetic test set (same for every seed and row)."""
    video = np.repeat(np.arange(VIDEOS), FRAMES)
    labels = (video >= VIDEOS // 2).astype(np.int64)
    ids = [f"{test_set}/v{v}" for v in video]
    return [f"{i}/f{k % FRAMES}" for k, i in enumerate(ids)], labels, video, ids


def write_run(
    folder: Path,
    *,
    seed: int,
    rows: Mapping[str, tuple[dict[str, Any], ScoreFn]],
    stage: str = "pipeline",
    benchmark: str = "synthetic",
    theta0_hash: str = "theta0aaaa",
    overrides: Sequence[str] | None = None,
    protocols: Mapping[str, list[str]] = PROTOCOLS,
) -> Path:
    """One run folder: ``.hydra/{overrides,config}.yaml``, ``metrics.json`` and every scores CSV."""
    hydra = folder / ".hydra"
    hydra.mkdir(parents=True, exist_ok=True)
    if overrides is None:
        overrides = [f"stage={stage}", f"seed={seed}"]
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    config = {"seed": seed, "stage": {"name": stage}, "benchmark": {"name": benchmark}}
    if not (hydra / "config.yaml").is_file():
        (hydra / "config.yaml").write_text(yaml.safe_dump(config))
    models, infos = {}, {}
    for label, (info, score_fn) in rows.items():
        infos[label] = {
            "kind": "merger",
            "merger": None,
            "variant": None,
            "hparams": None,
            "selection": None,
            "families": ["swap", "edit"],
            "merge_seconds": None,
            "peak_memory_bytes": None,
            **info,
        }
        test = {}
        for names in protocols.values():
            for name in names:
                keys, labels, video, ids = set_frames(name)
                scores = score_fn(labels, video, name, seed)
                test[name] = evaluate_scores(scores, labels, ids, threshold=0.5)
                base = folder / "scores" / safe_name(label) / safe_name(name)
                base.parent.mkdir(parents=True, exist_ok=True)
                with base.with_name(base.name + ".csv").open("w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["frame", "video_id", "label", "score"])
                    w.writerows(zip(keys, ids, labels.tolist(), scores.tolist(), strict=True))
                v_scores, v_labels, v_ids = video_scores(scores, labels, ids)
                with base.with_name(base.name + ".videos.csv").open("w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["video_id", "label", "score"])
                    w.writerows(zip(v_ids, v_labels.tolist(), v_scores.tolist(), strict=True))
        models[label] = {
            "checkpoint": f"/ckpt/{safe_name(label)}.safetensors",
            "threshold": 0.5,
            "validation": {},
            "test": test,
        }
    metrics = {
        "stage": stage,
        "benchmark": benchmark,
        "seed": seed,
        "backbone": "tiny",
        "theta0": {"path": f"/artifacts/base/{theta0_hash}.safetensors", "hash": theta0_hash},
        "protocols": {p: list(n) for p, n in protocols.items()},
        "models": models,
        "rows": infos,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def standard_rows(
    better: float = 2.0, r2m: float = 1.0, average: float = 0.5
) -> dict[str, tuple[dict[str, Any], ScoreFn]]:
    """A specialist, the average and r2m mergers, and a third merger ``ties`` of the given strengths."""
    return {
        "specialist:swap": ({"kind": "specialist", "families": ["swap"]}, noisy(0.8)),
        "average": ({"merger": "average"}, noisy(average)),
        "r2m": ({"merger": "r2m"}, noisy(r2m)),
        "ties": ({"merger": "ties"}, noisy(better)),
    }


def hydra_sweep(root: Path, *overrides: str) -> Path:
    """A real multirun of the real config with a no-op task: multirun.yaml and job folders with ``.hydra/``, no
    metrics (every job looks failed until a test writes its metrics)."""
    script = root / "noop_app.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import hydra

            @hydra.main(version_base="1.3", config_path={str(CONF)!r}, config_name="config")
            def main(cfg):
                pass

            main()
            """
        )
    )
    sweep = root / "multirun" / "2026-12-03" / "12-00-00"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(script), "-m", *overrides, f"paths.root={root}", f"hydra.sweep.dir={sweep}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def job_folders(sweep: Path) -> dict[frozenset[str], Path]:
    """The sweep's job folders by their overrides."""
    return {frozenset(yaml.safe_load((p / "overrides.yaml").read_text())): p.parent for p in sweep.rglob(".hydra")}
