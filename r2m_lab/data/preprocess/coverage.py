"""The coverage report of one dataset (counts per label, named problems) and its Markdown table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from r2m_lab.data.preprocess.plan import Plan
from r2m_lab.data.preprocess.settings import CropSettings


def coverage(
    p: Plan,
    results: Mapping[str, Mapping[str, Any]],
    dataset: str,
    labels: Mapping[str, int],
    settings: CropSettings,
    run_fp: str,
    run_config: Mapping[str, Any],
) -> dict[str, Any]:
    """Counts per label and the named problems of one dataset; no timings or absolute paths, so a re-run writes
    the same bytes."""
    rows = {
        label: dict.fromkeys(
            ("videos", "indexed", "corrupt", "failed", "faceless_videos", "frames_sampled", "frames_read")
            + ("faces", "no_face_frames", "centre_crops", "unreadable_frames", "aligned", "frames_indexed"),
            0,
        )
        for label in labels
    }
    problems: dict[str, list[Any]] = {"corrupt": [], "failed": [], "faceless": [], "unreadable": [], "no_face": []}
    for job in p.jobs:
        mine = [e for e in job.entries if e.dataset == dataset]
        if not mine:
            continue
        r = results[job.out_dir]
        row = rows[mine[0].label]
        row["videos"] += 1
        if r["status"] in ("corrupt", "failed"):
            row[r["status"]] += 1
            problems[r["status"]].append({"video": job.name, "error": r["error"]})
            continue
        n_read = len(r["sampled"]) - len(r["unreadable"])
        row["frames_sampled"] += len(r["sampled"])
        row["frames_read"] += n_read
        row["faces"] += n_read - len(r["no_face"])
        row["no_face_frames"] += len(r["no_face"])
        row["centre_crops"] += len(r["centre_crops"])
        row["unreadable_frames"] += len(r["unreadable"])
        row["aligned"] += r["aligned"]
        row["frames_indexed"] += len(r["frames"])
        row["indexed"] += bool(r["frames"])
        if n_read and len(r["no_face"]) == n_read:
            row["faceless_videos"] += 1
            problems["faceless"].append(job.name)
        if r["unreadable"]:
            problems["unreadable"].append({"video": job.name, "frames": r["unreadable"]})
        if r["no_face"]:
            problems["no_face"].append({"video": job.name, "frames": r["no_face"]})
    return {
        "dataset": dataset,
        "fingerprint": run_fp,
        "run": dict(run_config),
        "settings": settings.as_dict(),
        "labels": dict(labels),
        "rows": rows,
        "problems": problems,
        "notes": list(p.notes),
    }


def coverage_table(datasets: Mapping[str, Mapping[str, Any]]) -> str:
    """The coverage of every dataset and label as a Markdown table (faces found / frames read)."""
    lines = [
        "| dataset | label | videos | indexed | corrupt | no face at all | frames sampled | read | faces | "
        "no face | centre crops | unreadable | face coverage |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, cov in datasets.items():
        for label, r in cov["rows"].items():
            share = f"{r['faces'] / r['frames_read']:.1%}" if r["frames_read"] else "—"
            lines.append(
                f"| {name} | {label} | {r['videos']} | {r['indexed']} | {r['corrupt'] + r['failed']} | "
                f"{r['faceless_videos']} | {r['frames_sampled']} | {r['frames_read']} | {r['faces']} | "
                f"{r['no_face_frames']} | {r['centre_crops']} | {r['unreadable_frames']} | {share} |"
            )
    return "\n".join(lines)
