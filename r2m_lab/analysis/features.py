"""One streamed pass over frames through several models: paired moments per class (`similarity.PairedMoments`)
and each model's class means, for the feature similarity and the real/fake directions.

Every model sees each batch once; its pooled features (B, D) update the moments and are dropped. Memory: for each
(specialist, merged) pair three D×D float64 sums per class, never an (n, D) feature matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from r2m_lab.analysis.similarity import PairedMoments

CLASSES = ("real", "fake")  # label 0, label 1


@dataclass
class FeatureStats:
    """What one pass over one frame set collected, per class name (``real`` | ``fake``)."""

    pairs: dict[str, dict[tuple[str, str], PairedMoments]] = field(default_factory=dict)
    means: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # class → model → (D,) float64 mean feature
    counts: dict[str, int] = field(default_factory=dict)  # class → frames

    def similarity(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """``{class: {"<a>|<b>": {"cka": ..., "mean_cosine": ..., "frames": n}}}``; a class with no frame is absent."""
        return {
            name: {
                f"{a}|{b}": {"cka": m.cka(), "mean_cosine": m.mean_cosine(), "frames": m.n}
                for (a, b), m in pairs.items()
            }
            for name, pairs in self.pairs.items()
        }


def pooled(model: nn.Module, x: Tensor) -> Tensor:
    """The pooled features (B, D) a backbone gives (what the head sees); anything else is refused."""
    features = model(x)
    if features.ndim != 2:
        raise ValueError(f"the backbone returns features of shape {tuple(features.shape)}, not pooled (B, D)")
    return features


@torch.inference_mode()
def collect(
    backbones: Mapping[str, nn.Module],
    pairs: Sequence[tuple[str, str]],
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> FeatureStats:
    """Stream ``batches`` of (images (B, 3, S, S), labels (B,) 0 real / 1 fake) through every backbone once.

    ``pairs``: (a, b) names of ``backbones`` whose similarity is wanted. Returns the moments per class and pair, and
    each backbone's mean feature per class. The backbones are put in eval mode on ``device``.
    """
    unknown = sorted({name for pair in pairs for name in pair} - set(backbones))
    if unknown:
        raise ValueError(f"pairs name backbones {unknown} that are not given ({sorted(backbones)})")
    for model in backbones.values():
        model.eval().to(device)
    stats = FeatureStats()
    sums: dict[str, dict[str, Tensor]] = {}
    for x, labels in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        x = x.to(device, non_blocking=True)
        features = {name: pooled(model, x).to(torch.float64) for name, model in backbones.items()}  # (B, D) each
        labels = torch.as_tensor(labels).to(features[next(iter(features))].device)
        for value, name in enumerate(CLASSES):
            mask = labels == value
            count = int(mask.sum())
            if not count:
                continue
            stats.counts[name] = stats.counts.get(name, 0) + count
            by_pair = stats.pairs.setdefault(name, {pair: PairedMoments() for pair in pairs})
            for a, b in pairs:
                by_pair[(a, b)].update(features[a][mask], features[b][mask])
            class_sums = sums.setdefault(name, {})
            for model_name, feats in features.items():
                total = feats[mask].sum(0)
                class_sums[model_name] = class_sums[model_name] + total if model_name in class_sums else total
    stats.means = {
        name: {model: (total / stats.counts[name]).cpu() for model, total in by_model.items()}
        for name, by_model in sums.items()
    }
    return stats
