"""stage=preprocess: raw videos → face crops + DeepfakeBench JSON indexes (the work is in r2m_lab.data.preprocess)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from r2m_lab.atomic import write_json_atomic
from r2m_lab.data.faces import resolve_detector_name
from r2m_lab.data.preprocess import LAYOUTS, CropSettings, plan, run_preprocess
from r2m_lab.stages.artifacts import output_dir
from r2m_lab.stages.config_nodes import plain

log = logging.getLogger(__name__)


def preprocess(cfg: DictConfig) -> dict[str, Any]:
    """Read ``cfg.stage`` (conf/stage/preprocess.yaml), crop every video, write the indexes and coverage reports;
    the run folder's ``metrics.json`` gets the summary (coverage per dataset and label, where each index went)."""
    st = cfg.stage
    if st.input is None:
        raise ValueError(
            f"stage=preprocess needs stage.input=<folder of raw videos> (and stage.layout, one of {LAYOUTS})"
        )
    layout = str(st.layout)
    common = {"split_ratios": plain(st.split_ratios), "extensions": list(st.extensions)}
    options = {
        "ffpp": {
            "compression": st.compression,
            "methods": plain(st.methods),
            "split_dir": st.split_dir,
            **common,
        },
        "celebdf": {
            "dataset": st.dataset or "Celeb-DF-v2",
            "real_label": st.real_label,
            "fake_label": st.fake_label,
            **common,
        },
        "folder": {
            "dataset": st.dataset,
            "label": st.label,
            "label_value": st.label_value,
            "split": st.split,
            **common,
        },
    }
    if layout not in options:
        raise ValueError(f"stage.layout={layout!r}; valid: {list(LAYOUTS)}")
    settings = CropSettings(
        frames_per_video=int(st.frames_per_video),
        size=int(st.size),
        margin=float(st.margin),
        detector=resolve_detector_name(str(st.detector)),
        detector_options=plain(st.detector_options) or {},
        no_face=str(st.no_face),
    )
    input_dir = Path(str(st.input)).absolute()
    the_plan = plan(layout, input_dir, **options[layout])
    run_config = {"layout": layout, "input": str(input_dir), **options[layout]}
    summary = run_preprocess(
        the_plan,
        Path(str(st.output)).absolute(),
        settings,
        run_config,
        workers=int(st.workers),
        overwrite=bool(st.overwrite),
        progress=bool(st.progress),
    )
    write_json_atomic(output_dir(cfg) / "metrics.json", summary)
    return summary
