"""stage=preprocess: raw videos → face crops + DeepfakeBench JSON indexes (the work is in r2m_lab.data.preprocess).

The input tree is read by the planner that ``cfg.layout`` (the ``conf/layout/`` group) names by ``_target_``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig

from r2m_lab.atomic import write_json_atomic
from r2m_lab.data.faces import resolve_detector_name
from r2m_lab.data.preprocess import CropSettings, Layout, plan, run_preprocess
from r2m_lab.stages.artifacts import output_dir
from r2m_lab.stages.config_nodes import plain

log = logging.getLogger(__name__)


def preprocess(cfg: DictConfig) -> dict[str, Any]:
    """Read ``cfg.stage`` (conf/stage/preprocess.yaml) and ``cfg.layout`` (conf/layout/), crop every video, write the
    indexes and coverage reports; the run folder's ``metrics.json`` gets the summary (coverage per dataset and
    label, where each index went)."""
    st = cfg.stage
    if st.input is None:
        raise ValueError("stage=preprocess needs stage.input=<folder of raw videos> (and layout=ffpp|celebdf|folder)")
    if cfg.get("layout") is None:
        raise ValueError("stage=preprocess needs a layout (layout=ffpp|celebdf|folder, conf/layout/)")
    layout = build_layout(cfg.layout)
    settings = CropSettings(
        frames_per_video=int(st.frames_per_video),
        size=int(st.size),
        margin=float(st.margin),
        detector=resolve_detector_name(str(st.detector)),
        detector_options=plain(st.detector_options) or {},
        no_face=str(st.no_face),
    )
    input_dir = Path(str(st.input)).absolute()
    split_ratios, extensions = plain(st.split_ratios), list(st.extensions)
    the_plan = plan(layout, input_dir, split_ratios, extensions)
    # What decides the indexes besides the crop settings: its fingerprint marks a resume of the same config.
    run_config = {
        "layout": layout.name,
        "input": str(input_dir),
        **layout.options(),
        "split_ratios": split_ratios,
        "extensions": extensions,
    }
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


def build_layout(node: DictConfig) -> Layout:
    """The planner ``node._target_`` names, built with the entry's other keys as its knobs.

    Called directly rather than through ``hydra.utils.instantiate`` so that a bad knob raises the planner's own
    ``ValueError`` (naming ``layout.<knob>``), not a wrapped instantiation error.
    """
    knobs = plain(node)
    target = knobs.pop("_target_", None)
    if target is None:
        raise ValueError("layout: the entry names no planner (_target_); see conf/layout/")
    cls = get_class(str(target))
    if not isinstance(cls, type) or not all(hasattr(cls, a) for a in ("name", "expected", "plan", "options")):
        raise TypeError(f"layout._target_={target} is not a preprocessing layout (name, expected, options, plan)")
    try:
        return cls(**knobs)
    except TypeError as err:
        raise TypeError(f"layout={cls.name}: knobs {sorted(knobs)} do not fit {target}: {err}") from err
