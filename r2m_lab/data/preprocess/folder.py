"""``layout=folder``: any folder of videos, all of one label, into one dataset's index."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from r2m_lab.data.preprocess.plan import VIDEO_EXTENSIONS, Entry, Job, Plan, hash_split, list_videos


class FolderLayout:
    """Every video under the input folder (searched recursively), labelled ``label`` (``label_value`` 0 real /
    1 fake) in ``dataset``; every video goes to ``split``, or, when it is None, to a split by a fixed hash of its
    path. Video ids are the relative paths without suffix, ``/`` replaced by ``_``."""

    name = "folder"
    expected = f"a folder of videos ({', '.join(VIDEO_EXTENSIONS)}), all of one label"

    def __init__(
        self,
        dataset: str | None = None,
        label: str | None = None,
        label_value: int | None = None,
        split: str | None = None,
    ):
        for key, value in (("dataset", dataset), ("label", label), ("label_value", label_value)):
            if value is None:
                raise ValueError(f"layout=folder needs layout.{key} (dataset name, label name, label_value 0|1)")
        if int(label_value) not in (0, 1):
            raise ValueError(f"layout.label_value={label_value}; 0 (real) or 1 (fake)")
        if split is not None and split not in ("train", "val", "test"):
            raise ValueError(f"layout.split={split!r}; train, val, test, or null for a split by hash")
        self.dataset, self.label, self.label_value, self.split = str(dataset), str(label), label_value, split

    def options(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "label": self.label, "label_value": self.label_value, "split": self.split}

    def plan(self, root: Path, split_ratios: Mapping[str, float], extensions: Sequence[str]) -> Plan:
        jobs = []
        for p in list_videos(root, extensions, recursive=True):
            name = p.relative_to(root).as_posix()
            video = p.relative_to(root).with_suffix("").as_posix().replace("/", "_")
            where = self.split or hash_split(name, split_ratios)
            out_dir = f"{self.dataset}/{self.label}/frames/{video}"
            jobs.append(Job(str(p), name, out_dir, [Entry(self.dataset, self.label, where, video)]))
        return Plan(jobs, {self.dataset: {self.label: int(self.label_value)}})
