"""stage=tables: the paper's tables from sweep and run folders (:func:`r2m_lab.results.build.build_tables`), logged
as W&B Tables (CSV logger: the cell means as metrics), the Markdown printed at the end."""

from __future__ import annotations

import logging
import math
from typing import Any

from omegaconf import DictConfig

from r2m_lab.results.build import BuildResult, build_tables
from r2m_lab.results.tables import LEVELS
from r2m_lab.stages.artifacts import output_dir
from r2m_lab.stages.loggers import build_logger, close_logger, sweep_group

log = logging.getLogger(__name__)


def _runs(cfg: DictConfig) -> list[str]:
    runs = cfg.stage.get("runs")
    if runs is None or isinstance(runs, str) or not len(runs):
        raise ValueError(
            f"stage.runs={runs!r}: give a list of sweep and/or run folders, e.g. "
            "python -m r2m_lab stage=tables 'stage.runs=[multirun/2026-12-03/12-00-00]'"
        )
    return [str(r) for r in runs]


def log_tables(result: BuildResult, logger: Any) -> None:
    """Each table and level as a W&B Table (row × column texts); with another logger the cell means as metrics."""
    if type(logger).__name__ == "WandbLogger":
        for table in result.tables:
            for level in LEVELS:
                columns = ["row", *(c.name for c in table.columns)]
                data = [[r, *(table.cells[level][(r, c.name)].text() for c in table.columns)] for r in table.rows]
                logger.log_table(key=f"{table.name}/auc_{level}", columns=columns, data=data)
        return
    metrics = {
        f"{t.name}/{level}/{r}/{c.name}/auc_mean": t.cells[level][(r, c.name)].mean
        for t in result.tables
        for level in LEVELS
        for r in t.rows
        for c in t.columns
        if math.isfinite(t.cells[level][(r, c.name)].mean)
    }
    if metrics:
        logger.log_metrics(metrics)


def tables(cfg: DictConfig) -> dict[str, Any]:
    """Build and write every table; return tables.json's payload."""
    runs = _runs(cfg)
    out = output_dir(cfg)
    result = build_tables(
        runs,
        out,
        replicates=int(cfg.stage.bootstrap),
        seed=int(cfg.stage.bootstrap_seed),
        confidence=float(cfg.stage.confidence),
    )
    group = None
    if len(result.sweeps) == 1:  # the W&B group of the sweep's own jobs
        sweep = result.sweeps[0]
        stage = str((sweep.config.get("stage") or {}).get("name", "pipeline"))
        group = sweep_group(str(sweep.config["hydra"]["job"]["config_name"]), stage, sweep.folder)
    # "tables-<first table>": a file-system-safe name (the CSV logger makes it a folder of the run)
    logger = build_logger(cfg, name=f"tables-{result.tables[0].name}" if result.tables else "tables", group=group)
    if logger is not None:
        try:
            log_tables(result, logger)
        finally:
            close_logger(logger)
    log.info("Tables written under %s (%d files)", out, len(result.files))
    print(result.markdown)  # the run's final word: the tables, for the person at the terminal
    return result.summary
