"""The detector: a timm backbone and a 2-logit real/fake head, trained with Lightning (cross-entropy)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from tqdm.auto import tqdm

OptimizerFactory = Callable[..., torch.optim.Optimizer]

log = logging.getLogger(__name__)


class Detector(L.LightningModule):
    """Backbone features (B, D) → head logits (B, 2); P(fake) = softmax(logits)[:, 1].

    ``optimizer`` is a partial from config (``_partial_: true``) finished here with the parameters; every parameter
    (backbone and head) is trained, as in the paper's full fine-tuning. ``optimizer_options`` are extra keyword
    arguments for it (the GPU preset's ``fused=True``) and ``channels_last`` puts inputs in NHWC; both are set by
    :class:`r2m_lab.stages.devices.Speedups`.

    Under DDP each rank sees its shard of the data: validation metrics are reduced across ranks (the loss with
    ``sync_dist``; AUROC and accuracy are torchmetrics objects, whose states are gathered before they are computed).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, optimizer: OptimizerFactory | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.optimizer_factory = optimizer
        self.optimizer_options: dict[str, object] = {}
        self.channels_last = False
        self.val_auc = BinaryAUROC()
        self.val_acc = BinaryAccuracy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        if log.isEnabledFor(logging.DEBUG):  # which frames this rank drew (hydra.verbose=r2m_lab.detector shows it)
            log.debug("rank %d step %d frames %s", self.global_rank, self.global_step, idx.tolist())
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y, _ = batch
        logits = self(x)
        prob = logits.softmax(1)[:, 1]
        self.val_auc.update(prob, y)
        self.val_acc.update(prob, y)
        # The epoch's mean loss of each rank, averaged over ranks (equal shards: the mean over the whole split).
        self.log("val/loss", nn.functional.cross_entropy(logits, y), batch_size=len(y), sync_dist=True)
        # Metric objects: Lightning computes them at the epoch's end (states gathered from every rank) and resets.
        self.log_dict({"val/auc": self.val_auc, "val/acc": self.val_acc}, prog_bar=True, batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            raise ValueError("Detector was built without an optimizer; pass the recipe's optimizer partial")
        if self.optimizer_options:
            optimizer = getattr(self.optimizer_factory, "func", self.optimizer_factory)
            accepted = inspect.signature(optimizer).parameters
            unknown = sorted(k for k in self.optimizer_options if k not in accepted)
            if unknown:
                name = getattr(optimizer, "__qualname__", repr(optimizer))
                raise TypeError(
                    f"The recipe's optimizer {name} takes no {', '.join(unknown)} argument, which the trainer preset "
                    f"asks for (trainer.fused_optimizer=true): set trainer.fused_optimizer=false, or use "
                    "torch.optim.Adam / AdamW / SGD in backbone.recipe.optimizer."
                )
        return self.optimizer_factory(self.parameters(), **self.optimizer_options)

    def load_weights(self, backbone: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> None:
        """Load a backbone/head state; strict, so a checkpoint of another architecture is refused with its keys."""
        self.backbone.load_state_dict(dict(backbone), strict=True)
        self.head.load_state_dict(dict(head), strict=True)


@torch.inference_mode()
def score_frames(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", desc: str | None = None
) -> np.ndarray:
    """P(fake) for every frame of ``loader`` (in loader order), as a float64 array."""
    model.eval().to(device)
    out = np.empty(len(loader.dataset), dtype=np.float64)
    for x, _, idx in tqdm(loader, desc=desc, leave=False, disable=desc is None):
        prob = model(x.to(device, non_blocking=True)).float().softmax(1)[:, 1]
        out[idx.numpy()] = prob.cpu().numpy()
    return out
