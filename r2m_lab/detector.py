"""The detector: a timm backbone and a 2-logit real/fake head, trained with Lightning (cross-entropy)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from tqdm.auto import tqdm

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Detector(L.LightningModule):
    """Backbone features (B, D) → head logits (B, 2); P(fake) = softmax(logits)[:, 1].

    ``optimizer`` is a partial from config (``_partial_: true``) finished here with the parameters; every parameter
    (backbone and head) is trained, as in the paper's full fine-tuning.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, optimizer: OptimizerFactory | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.optimizer_factory = optimizer
        self.val_auc = BinaryAUROC()
        self.val_acc = BinaryAccuracy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
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
        self.log("val/loss", nn.functional.cross_entropy(logits, y), batch_size=len(y))

    def on_validation_epoch_end(self) -> None:
        self.log_dict({"val/auc": self.val_auc.compute(), "val/acc": self.val_acc.compute()}, prog_bar=True)
        self.val_auc.reset()
        self.val_acc.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            raise ValueError("Detector was built without an optimizer; pass the recipe's optimizer partial")
        return self.optimizer_factory(self.parameters())

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
