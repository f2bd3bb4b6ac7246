"""Raw videos → face crops + DeepfakeBench JSON indexes (what ``stage=preprocess`` runs).

Per video: ``frames_per_video`` frame indices evenly spaced over the video (``np.linspace`` over its frame count,
first and last included), the largest face of each sampled frame found by a pluggable detector
(:mod:`r2m_lab.data.faces`), a square crop of ``margin`` × the face box (or a 5-point similarity alignment where the
detector gives landmarks) resized to ``size``² and written as ``<frames dir>/<frame index>.png``. Then one index per
dataset at ``<output>/dataset_json/<dataset>.json`` (frame paths relative to ``<output>``) and a coverage report
``<dataset>.coverage.json`` beside it.

Modules: :mod:`.plan` (the plan and the :class:`Layout` contract), one planner per layout (:mod:`.ffpp`,
:mod:`.celebdf`, :mod:`.folder`; ``conf/layout/<name>.yaml`` names each by ``_target_``), :mod:`.settings` (the crop
settings and their fingerprint), :mod:`.video` (frame sampling and decoding), :mod:`.worker` (one video, its
manifest and the resume check), :mod:`.run` (the whole run, indexes, refusals), :mod:`.coverage` (the report).

Policies, all recorded in each video's ``manifest.json`` and in the coverage report, never silent:

- **No face** in a sampled frame: ``no_face=skip`` (default) leaves the frame out of the index and records its index;
  ``no_face=centre`` writes the frame's central square instead and records it as a centre crop. A video with no face
  in any frame has no frames, so it is left out of the index and listed in the report.
- **Corrupt videos** (will not open, no frame decodes) and **unreadable frames** (a sampled index that does not
  decode, or lies past the real end of a stream whose header over-counts) are counted and listed with their paths;
  the run goes on. A corrupt video gets no manifest, so a re-run tries it again.
- **Resume**: a video whose ``manifest.json`` (written atomically after all its frames) carries the same settings
  fingerprint and whose frames all exist is not decoded again. A frames folder from other settings, or one this code
  did not write, is refused up front unless ``overwrite=True``. Everything is deterministic (fixed frame indices,
  detector, crops, key-sorted JSON), so a re-run gives identical bytes.
- **Existing indexes**: refused up front unless their coverage report carries this run's fingerprint (a resume of
  the same config) or ``overwrite=True``; at the end an index equal to the one built is left untouched, a different
  one is replaced only with ``overwrite=True``.
"""

from r2m_lab.data.preprocess.celebdf import CelebDFLayout
from r2m_lab.data.preprocess.coverage import coverage_table
from r2m_lab.data.preprocess.ffpp import FFPPLayout
from r2m_lab.data.preprocess.folder import FolderLayout
from r2m_lab.data.preprocess.plan import VIDEO_EXTENSIONS, Entry, Job, Layout, Plan, hash_split, plan
from r2m_lab.data.preprocess.run import index_paths, run_preprocess
from r2m_lab.data.preprocess.settings import CropSettings
from r2m_lab.data.preprocess.video import CorruptVideo, read_sampled_frames, sample_indices
from r2m_lab.data.preprocess.worker import MANIFEST, VideoWorker, folder_state

__all__ = [
    "MANIFEST",
    "VIDEO_EXTENSIONS",
    "CelebDFLayout",
    "CorruptVideo",
    "CropSettings",
    "Entry",
    "FFPPLayout",
    "FolderLayout",
    "Job",
    "Layout",
    "Plan",
    "VideoWorker",
    "coverage_table",
    "folder_state",
    "hash_split",
    "index_paths",
    "plan",
    "read_sampled_frames",
    "run_preprocess",
    "sample_indices",
]
