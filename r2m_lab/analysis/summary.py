"""Several ``stage=analyze`` runs (typically one per training seed) read side by side: the headline numbers of each
analysis as mean ± std over the runs, with every run's own value, as a Markdown report.

    python -m r2m_lab.analysis.summary <run or sweep folder, or analysis.json> ... [--out summary.md]

What it reports, where the runs hold the part:

- curves: pooled AUC (all families' frames together) along θ₀ + τ_core + η·τ_res and along θ₀ + λ·τ̄; the best η
  and λ of each run; the dip (the lowest pooled AUC between η = 0 and the best η); η_match = meanᵢ‖rᵢ‖ / ‖τ_res‖, the
  η at which the merged residual is as large as a specialist's own (before truncation); each family's best η.
- spectra: the task-vector Gram's leading eigenvalue share, each τᵢ's energy share in the Real subspace, ‖τ_core‖,
  ‖τ_res‖ and the specialists' residual norms.
- similarity: linear CKA and mean cosine of a specialist's and a merged model's pooled features on the specialist's
  own family, on real and on fake frames separately (the averaging observation: real above fake).
- directions: the angle between a specialist's and a merged model's fake − real feature direction on the
  specialist's own family, and the lowest cosine between two heads' directions.
- interference: per layer group, the own-family AUC change when that group takes the merged weights (mean over
  families).

Runs must agree on what they measured (the same η and λ grids, split and families); a run that differs is refused
by name. A part that some runs lack is reported for the runs that have it, and says which lack it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r2m_lab.atomic import write_text_atomic

ANALYSIS = "analysis.json"


def load_runs(paths: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """{label: analysis.json payload}; a path is a run folder, its analysis.json, or a sweep folder (``-m
    stage=analyze seed=0,1,2``) whose job folders hold one each. Labels are ``seed<n>`` when every run has its own
    seed, else the run folders' names (made unique by their parents where two names repeat)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / ANALYSIS).is_file():
            jobs = sorted(p.glob(f"*/{ANALYSIS}"), key=lambda f: _job_order(f.parent.name))
            if jobs:
                files += jobs
                continue
        file = p / ANALYSIS if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(
                f"no {ANALYSIS} at {file}: pass the run folder of a `stage=analyze` run, or its sweep folder"
            )
        files.append(file)
    payloads = []
    for file in files:
        payload = json.loads(file.read_text())
        if payload.get("stage") != "analyze":
            raise ValueError(f"{file} is not the output of stage=analyze (stage {payload.get('stage')!r})")
        payloads.append(payload)
    seeds = [p.get("seed") for p in payloads]
    if None not in seeds and len(set(seeds)) == len(seeds):  # one run per seed (a seed sweep): named by its seed
        labels = [f"seed{s}" for s in seeds]
    else:
        names = [f.parent.name for f in files]
        labels = [
            n if names.count(n) == 1 else f"{f.parent.parent.name}/{n}" for f, n in zip(files, names, strict=True)
        ]
    if len(set(labels)) < len(labels):
        raise ValueError(f"the same run was given twice: {[str(f) for f in files]}")
    runs = dict(zip(labels, payloads, strict=True))
    _check_same_measurement(runs)
    return runs


def _job_order(name: str) -> tuple[int, str]:
    """A sweep's job folders in launch order: ``10_seed=2`` after ``9_seed=1``."""
    head = name.split("_", 1)[0]
    return (int(head), name) if head.isdigit() else (1 << 30, name)


def _check_same_measurement(runs: Mapping[str, Mapping[str, Any]]) -> None:
    def facts(run: Mapping[str, Any]) -> dict[str, Any]:
        curves = run.get("curves") or {}
        return {
            "split": run.get("split"),
            "benchmark": run.get("benchmark"),
            "families": sorted(run.get("frames", {})),
            "eta grid": [p["eta"] for p in curves.get("eta", [])] or None,
            "lambda grid": [p["lambda"] for p in curves.get("lambda", [])] or None,
        }

    (first, reference), *rest = [(label, facts(run)) for label, run in runs.items()]
    for label, own in rest:
        for key, value in own.items():
            if value is not None and reference[key] is not None and value != reference[key]:
                raise ValueError(f"run {label} measured another {key} ({value}) than run {first} ({reference[key]})")


def mean_std(values: Sequence[float | None]) -> str:
    """'mean ± std' (sample std) of the values that exist; one value alone has no ± ; none at all: 'n/a'."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows)]


def _rows(
    runs: Mapping[str, Mapping[str, Any]], items: Sequence[tuple[str, Callable[[Mapping[str, Any]], Any]]]
) -> list[list[Any]]:
    """One row per (name, getter): the name, mean ± std over the runs, then each run's value."""
    rows = []
    for name, get in items:
        values = [get(run) for run in runs.values()]
        numeric = [v for v in values if isinstance(v, (int, float))]
        rows.append([name, mean_std(numeric) if numeric else "n/a", *values])
    return rows


def _closed(lines: list[str], part: str, lacking: Sequence[str]) -> list[str]:
    """A section's lines, then which runs lack the part (if any), then a blank line."""
    return [*lines, *(["", f"No {part} in {list(lacking)}."] if lacking else []), ""]


def _having(runs: Mapping[str, Mapping[str, Any]], part: str) -> tuple[dict[str, Mapping[str, Any]], list[str]]:
    have = {label: run for label, run in runs.items() if run.get(part)}
    return have, [label for label in runs if label not in have]


def eta_match(run: Mapping[str, Any]) -> float | None:
    """meanᵢ‖rᵢ‖ (before truncation) / ‖τ_res‖: the η at which the merged residual is as large as a specialist's."""
    real = (run.get("spectra") or {}).get("real_subspace")
    if not real or not real.get("residual_norm"):
        return None
    return float(np.mean(list(real["residual_norms_before"].values()))) / float(real["residual_norm"])


def best(points: Sequence[Mapping[str, Any]], key: str, family: str = "pooled") -> tuple[float, float] | None:
    """(knob value, AUC) of the highest AUC of ``family`` along a curve (the first of ties)."""
    scored = [(p[key], p["auc"].get(family)) for p in points if p["auc"].get(family) is not None]
    return max(scored, key=lambda kv: kv[1]) if scored else None


def dip(points: Sequence[Mapping[str, Any]]) -> tuple[float, float] | None:
    """(η, pooled AUC) of the lowest pooled AUC between η = 0 and the best η, or None when the best is η = 0."""
    top = best(points, "eta")
    inner = [(p["eta"], p["auc"]["pooled"]) for p in points if p["auc"].get("pooled") is not None]
    inner = [kv for kv in inner if top is not None and kv[0] <= top[0]]
    if top is None or top[0] == inner[0][0]:
        return None
    return min(inner, key=lambda kv: kv[1])


def curves_section(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    have, lacking = _having(runs, "curves")
    if not have:
        return []
    labels = list(have)
    first = next(iter(have.values()))["curves"]
    lines = [f"### η and λ paths (pooled frame AUC, {first['split']} split)", ""]

    def pooled(curve: str, i: int) -> Callable[[Mapping[str, Any]], Any]:
        return lambda r: r["curves"][curve][i]["auc"].get("pooled")

    points = [(f"η = {p['eta']:g}", pooled("eta", i)) for i, p in enumerate(first["eta"])]
    points += [(f"λ = {p['lambda']:g}", pooled("lambda", i)) for i, p in enumerate(first["lambda"])]
    rows = _rows(have, points)
    lines += _table(["point", "mean ± std", *labels], rows)
    lines += ["", "Where the curves peak and dip:", ""]

    def at(pair: tuple[float, float] | None, which: int) -> float | None:
        return None if pair is None else pair[which]

    items: list[tuple[str, Callable[[Mapping[str, Any]], Any]]] = [
        ("best η", lambda r: at(best(r["curves"]["eta"], "eta"), 0)),
        ("AUC at the best η", lambda r: at(best(r["curves"]["eta"], "eta"), 1)),
        (
            "AUC at η = 0 (core only)",
            lambda r: r["curves"]["eta"][0]["auc"].get("pooled") if r["curves"]["eta"][0]["eta"] == 0 else None,
        ),
        ("η of the dip before the best η", lambda r: at(dip(r["curves"]["eta"]), 0)),
        ("AUC at the dip", lambda r: at(dip(r["curves"]["eta"]), 1)),
        ("η_match = meanᵢ‖rᵢ‖ / ‖τ_res‖", eta_match),
        ("best λ", lambda r: at(best(r["curves"]["lambda"], "lambda"), 0)),
        ("AUC at the best λ", lambda r: at(best(r["curves"]["lambda"], "lambda"), 1)),
    ]
    families = sorted(k for k in first["eta"][0]["auc"] if k != "pooled")
    items += [(f"best η for {f} alone", lambda r, f=f: at(best(r["curves"]["eta"], "eta", f), 0)) for f in families]
    lines += _table(["", "mean ± std", *labels], _rows(have, items))
    return _closed(lines, "curves", lacking)


def spectra_section(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    have, lacking = _having(runs, "spectra")
    if not have:
        return []
    first = next(iter(have.values()))["spectra"]
    families = first["real_subspace"]["families"]
    items: list[tuple[str, Callable[[Mapping[str, Any]], Any]]] = [
        ("Gram: leading eigenvalue's share of the trace", lambda r: r["spectra"]["gram"]["energy_share"][0]),
        ("Gram: 1/N (no shared direction)", lambda r: 1.0 / len(r["spectra"]["gram"]["families"])),
        ("‖τ_core‖", lambda r: r["spectra"]["real_subspace"]["core_norm"]),
        ("‖τ_res‖ (merged residual, before η)", lambda r: r["spectra"]["real_subspace"]["residual_norm"]),
    ]
    for f in families:
        items.append(
            (
                f"τ_{f}: energy share in the Real subspace",
                lambda r, f=f: r["spectra"]["real_subspace"]["subspace_fraction"][f],
            )
        )
    for f in families:
        items.append((f"‖r_{f}‖ before → after truncation", lambda r, f=f: _before_after(r, f)))
    lines = ["### Task-vector spectra and the Real subspace", ""]
    lines += _table(["", "mean ± std", *have], _rows(have, items))
    return _closed(lines, "spectra", lacking)


def _before_after(run: Mapping[str, Any], family: str) -> str:
    real = run["spectra"]["real_subspace"]
    return f"{real['residual_norms_before'][family]:.3f} → {real['residual_norms_after'][family]:.3f}"


def _merged_labels(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    labels: list[str] = []
    for run in runs.values():
        labels += [m for m in run.get("merged", {}) if m not in labels]
    return labels


def similarity_section(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    have, lacking = _having(runs, "similarity")
    if not have:
        return []

    def own(run: Mapping[str, Any], merged: str, cls: str, metric: str) -> float | None:
        values = []
        for family, by_class in run["similarity"]["families"].items():
            cell = by_class.get(cls, {}).get(f"specialist:{family}|{merged}")
            if cell and cell.get(metric) is not None:
                values.append(cell[metric])
        return float(np.mean(values)) if values else None

    items = []
    for merged in _merged_labels(have):
        for metric, name in (("cka", "linear CKA"), ("mean_cosine", "mean cosine")):
            for cls in ("real", "fake"):
                items.append((f"{merged}: {name}, {cls} frames", lambda r, m=merged, c=cls, k=metric: own(r, m, c, k)))
    lines = [
        "### Specialist vs merged features on the specialist's own family (mean over families)",
        "",
        *_table(["", "mean ± std", *have], _rows(have, items)),
    ]
    return _closed(lines, "similarity", lacking)


def directions_section(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    have, lacking = _having(runs, "directions")
    if not have:
        return []

    def own_angle(run: Mapping[str, Any], merged: str) -> float | None:
        values = [
            angles.get(pair.split("|")[0].removeprefix("specialist:"))
            for pair, angles in run["directions"]["pairs"].items()
            if pair.endswith(f"|{merged}")
        ]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    def lowest_head_cosine(run: Mapping[str, Any]) -> float:
        cosines = np.asarray(run["directions"]["heads"]["cosines"], dtype=float)
        return float(cosines[~np.eye(len(cosines), dtype=bool)].min())

    items: list[tuple[str, Callable[[Mapping[str, Any]], Any]]] = [
        (f"{m}: angle of fake − real directions, own family (°)", lambda r, m=m: own_angle(r, m))
        for m in _merged_labels(have)
    ]
    items.append(("lowest cosine between two heads' directions", lowest_head_cosine))
    lines = ["### Fake − real directions and heads", "", *_table(["", "mean ± std", *have], _rows(have, items))]
    return _closed(lines, "directions", lacking)


def interference_section(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    have, lacking = _having(runs, "interference")
    if not have:
        return []
    lines = ["### Per-layer interference: own-family AUC change when one group takes the merged weights", ""]
    for merged in _merged_labels(have):
        with_it = {label: run for label, run in have.items() if merged in run["interference"]}
        groups = next(iter(with_it.values()))["interference"][merged]["groups"]

        def mean_delta(run: Mapping[str, Any], group: str, m: str = merged) -> float | None:
            deltas = [f["delta"].get(group) for f in run["interference"][m]["families"].values()]
            deltas = [d for d in deltas if d is not None]
            return float(np.mean(deltas)) if deltas else None

        def mean_auc(run: Mapping[str, Any], key: str, m: str = merged) -> float | None:
            aucs = [f.get(key) for f in run["interference"][m]["families"].values()]
            aucs = [a for a in aucs if a is not None]
            return float(np.mean(aucs)) if aucs else None

        items = [
            ("specialist on its own family: AUC", lambda r: mean_auc(r, "specialist_auc")),
            (f"{merged} on each specialist's family: AUC", lambda r: mean_auc(r, "merged_auc")),
            *((f"{merged}: {g}", lambda r, g=g: mean_delta(r, g)) for g in groups),
        ]
        lines += [*_table(["", "mean ± std", *with_it], _rows(with_it, items)), ""]
    return _closed(lines[:-1], "interference", lacking)


def summary_markdown(runs: Mapping[str, Mapping[str, Any]]) -> str:
    labels = ", ".join(f"{label} (seed {run.get('seed')})" for label, run in runs.items())
    lines = [f"## Analysis over {len(runs)} run(s): {labels}", ""]
    for section in (curves_section, spectra_section, similarity_section, directions_section, interference_section):
        lines += section(runs)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r2m_lab.analysis.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="stage=analyze run folders (or their analysis.json)")
    parser.add_argument("--out", help="also write the Markdown here (atomically)")
    args = parser.parse_args(argv)
    text = summary_markdown(load_runs(args.runs))
    print(text)
    if args.out:
        write_text_atomic(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
