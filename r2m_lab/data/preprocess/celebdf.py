"""``layout=celebdf``: a Celeb-DF v1/v2 tree → one index, its test split exactly the official test list."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from r2m_lab.data.preprocess.plan import Entry, Job, Plan, frames_dir, hash_split, list_videos, require_dir

CELEBDF_FOLDERS = {"Celeb-real": "real", "YouTube-real": "real", "Celeb-synthesis": "fake"}
CELEBDF_TEST_LIST = "List_of_testing_videos.txt"
CELEBDF_LABELS = {
    "Celeb-DF-v1": ("CelebDFv1_real", "CelebDFv1_fake"),
    "Celeb-DF-v2": ("CelebDFv2_real", "CelebDFv2_fake"),
}


class CelebDFLayout:
    """Celeb-DF: ``Celeb-real`` and ``YouTube-real`` are real, ``Celeb-synthesis`` fake; the videos listed in
    ``List_of_testing_videos.txt`` (lines ``<0|1> <folder>/<file>``; only the path is used, the folder gives the
    label) are the test split, and only those (the reference JSONs also list them in train: not copied). The rest
    are split into train and val by a fixed hash in the proportion of ``split_ratios`` train : val.

    ``dataset`` names the index (null: ``Celeb-DF-v2``); the label names default to DeepfakeBench's for v1 and v2 and
    must be given for any other dataset name.
    """

    name = "celebdf"
    expected = f"a Celeb-DF tree: Celeb-real/, YouTube-real/, Celeb-synthesis/ (*.mp4) and {CELEBDF_TEST_LIST}"

    def __init__(
        self, dataset: str | None = "Celeb-DF-v2", real_label: str | None = None, fake_label: str | None = None
    ):
        self.dataset = dataset or "Celeb-DF-v2"
        self.given_labels = (real_label, fake_label)
        if real_label is None or fake_label is None:
            if self.dataset not in CELEBDF_LABELS:
                raise ValueError(
                    f"layout.dataset={self.dataset!r}: give layout.real_label and layout.fake_label (known defaults "
                    f"for {sorted(CELEBDF_LABELS)})"
                )
            real_label = real_label or CELEBDF_LABELS[self.dataset][0]
            fake_label = fake_label or CELEBDF_LABELS[self.dataset][1]
        self.real_label, self.fake_label = real_label, fake_label

    def options(self) -> dict[str, Any]:
        # The labels as given (null = the dataset's default): what the run fingerprint has always recorded.
        return {"dataset": self.dataset, "real_label": self.given_labels[0], "fake_label": self.given_labels[1]}

    def plan(self, root: Path, split_ratios: Mapping[str, float], extensions: Sequence[str]) -> Plan:
        for folder in CELEBDF_FOLDERS:
            require_dir(root / folder, self.name, self.expected)
        test_list = root / CELEBDF_TEST_LIST
        if not test_list.is_file():
            raise FileNotFoundError(f"layout=celebdf: no {test_list.absolute()}; expected {self.expected}")
        test: set[str] = set()
        for n, line in enumerate(test_list.read_text(encoding="utf-8").splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[0] not in ("0", "1"):
                raise ValueError(f"{test_list}:{n}: expected '<0|1> <folder>/<file>', got {line!r}")
            test.add(fields[1].replace("\\", "/"))
        trainval = split_ratios["train"] + split_ratios["val"]
        if trainval <= 0:
            raise ValueError("stage.split_ratios: Celeb-DF needs train + val > 0 for its non-test videos")
        sub = {"train": split_ratios["train"] / trainval, "val": split_ratios["val"] / trainval, "test": 0.0}
        jobs, seen = [], {}
        for folder, kind in CELEBDF_FOLDERS.items():
            label = self.real_label if kind == "real" else self.fake_label
            for p in list_videos(root / folder, extensions):
                name = p.relative_to(root).as_posix()
                if (label, p.stem) in seen:
                    raise ValueError(
                        f"Celeb-DF: {name} and {seen[(label, p.stem)]} would both be video {p.stem} of {label}"
                    )
                seen[(label, p.stem)] = name
                split = "test" if name in test else hash_split(name, sub)
                entry = Entry(self.dataset, label, split, p.stem)
                jobs.append(Job(str(p), name, frames_dir(root, p, self.dataset), [entry]))
        listed = {j.name for j in jobs}
        notes = [f"{CELEBDF_TEST_LIST} lists {t}, which is not in the input" for t in sorted(test - listed)]
        return Plan(jobs, {self.dataset: {self.real_label: 0, self.fake_label: 1}}, notes)
