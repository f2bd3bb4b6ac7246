"""A whole preprocessing run: every video of a plan (in process or in a process pool), then each dataset's index
and coverage report, with the checks that keep a re-run from touching what another config or a person prepared."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm import tqdm

from r2m_lab.atomic import write_json_atomic
from r2m_lab.data.index import add_video, video_record, write_index
from r2m_lab.data.preprocess.coverage import coverage, coverage_table
from r2m_lab.data.preprocess.plan import Plan
from r2m_lab.data.preprocess.settings import CropSettings, stable_hash
from r2m_lab.data.preprocess.worker import VideoWorker, folder_state, run_in_pool_worker, start_pool_worker

log = logging.getLogger(__name__)


def index_paths(out_root: Path, dataset: str) -> tuple[Path, Path]:
    """``<out_root>/dataset_json/<dataset>.json`` and its coverage report ``<dataset>.coverage.json``."""
    folder = out_root / "dataset_json"
    return folder / f"{dataset}.json", folder / f"{dataset}.coverage.json"


def run_preprocess(
    p: Plan,
    out_root: str | os.PathLike[str],
    settings: CropSettings,
    run_config: Mapping[str, Any],
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Process every video of ``p`` into ``out_root``, write each dataset's index and coverage report.

    ``run_config`` (layout, input, split knobs: whatever decides the indexes besides ``settings``) goes into the run
    fingerprint that marks a resume. ``workers`` processes crop in parallel (0: in this process); the output does
    not depend on it. Returns ``{"datasets": {name: coverage}, "indexes": {...}, ...}``.
    """
    out_root = Path(out_root)
    fp = settings.fingerprint()
    run_fp = stable_hash({"settings": fp, "run": dict(run_config)})
    _check_existing(p, out_root, fp, run_fp, overwrite)
    for note in p.notes:
        log.warning("preprocess: %s", note)

    results: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(p.jobs), desc="preprocess", unit="video", disable=not progress)
    if workers <= 0:
        worker = VideoWorker(settings, out_root)
        for job in p.jobs:
            results[job.out_dir] = worker.run(job)
            bar.update()
    else:
        # spawn, not fork: a forked child inherits OpenCV's / torch's thread pools mid-state and can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=int(workers),
            mp_context=context,
            initializer=start_pool_worker,
            initargs=(settings, str(out_root)),
        ) as pool:
            futures = {pool.submit(run_in_pool_worker, job): job.out_dir for job in p.jobs}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
    bar.close()
    for r in results.values():
        if r["status"] != "done":
            log.warning("preprocess: %s video %s: %s (reported, not indexed)", r["status"], r["source"], r["error"])
        elif r["unreadable"]:
            log.warning("preprocess: %s: frames %s do not decode (reported)", r["source"], r["unreadable"])

    indexes: dict[str, dict[str, Any]] = {}
    for job in p.jobs:
        r = results[job.out_dir]
        if r["status"] != "done" or not r["frames"]:
            continue
        for e in job.entries:
            record = video_record(e.label, r["frames"])
            add_video(indexes.setdefault(e.dataset, {}), e.dataset, e.label, e.split, e.video, record, e.compression)

    summary: dict[str, Any] = {"fingerprint": run_fp, "settings": settings.as_dict(), "datasets": {}, "indexes": {}}
    for dataset, labels in p.labels.items():
        report = coverage(p, results, dataset, labels, settings, run_fp, run_config)
        summary["datasets"][dataset] = report
        index_path, coverage_path = index_paths(out_root, dataset)
        if dataset not in indexes:
            log.error("preprocess: dataset %s has no video with a face crop: no index written", dataset)
            summary["indexes"][dataset] = None
            continue
        state = _write_unless_equal(index_path, indexes[dataset], overwrite, index=True)
        _write_unless_equal(coverage_path, report, overwrite or state == "written", index=False)
        summary["indexes"][dataset] = {"path": str(index_path), "coverage": str(coverage_path), "state": state}
    summary["videos"] = len(p.jobs)
    summary["resumed"] = sum(bool(r.get("resumed")) for r in results.values())
    log.info("preprocess coverage (%s):\n%s", out_root, coverage_table(summary["datasets"]))
    return summary


def _check_existing(p: Plan, out_root: Path, fp: str, run_fp: str, overwrite: bool) -> None:
    """Refuse, before any work, to touch what another config or a person prepared (unless ``overwrite``)."""
    if overwrite:
        return
    for dataset in p.labels:
        index_path, coverage_path = index_paths(out_root, dataset)
        if not index_path.exists():
            continue
        theirs = None
        if coverage_path.is_file():
            try:
                theirs = json.loads(coverage_path.read_text(encoding="utf-8")).get("fingerprint")
            except json.JSONDecodeError:
                theirs = None
        if theirs != run_fp:
            raise FileExistsError(
                f"Index {index_path.absolute()} already exists and was not written by this preprocess config "
                f"({'no coverage report beside it' if theirs is None else 'another config wrote it'}); "
                "pass stage.overwrite=true to replace it, or choose another stage.output"
            )
    clash = []
    for job in p.jobs:
        state = folder_state(out_root / job.out_dir, fp)
        if state in ("other", "foreign"):
            clash.append(f"{out_root / job.out_dir} ({'other settings' if state == 'other' else 'not written here'})")
    if clash:
        raise FileExistsError(
            f"{len(clash)} frames folders already hold other crops, e.g. {clash[:3]}; pass stage.overwrite=true to "
            "replace them, or choose another stage.output"
        )


def _write_unless_equal(path: Path, obj: Mapping[str, Any], overwrite: bool, index: bool) -> str:
    """``unchanged`` when ``path`` already holds ``obj``; else write it (existing file: only with overwrite)."""
    if path.is_file():
        try:
            if json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(obj, default=str)):
                return "unchanged"
        except json.JSONDecodeError:
            pass
        if not overwrite:
            raise FileExistsError(
                f"{path.absolute()} exists and differs from what this run built (the input changed since it was "
                "written?); pass stage.overwrite=true to replace it (finished videos are not decoded again)"
            )
    if index:
        write_index(path, obj, overwrite=overwrite)
    else:
        write_json_atomic(path, obj)
    return "written"
