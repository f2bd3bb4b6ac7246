"""Feature similarity between two models on the same frames, streamed batch by batch: linear CKA and mean cosine.

Linear CKA (Kornblith et al., "Similarity of neural network representations revisited", ICML 2019) in its
feature-space form: with X (n, Dx), Y (n, Dy) the pooled features centred over the n frames,

    CKA(X, Y) = ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F),

equal to the n×n Gram form ⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖) with K = XXᵀ, L = YYᵀ, but needing only D×D sums. `PairedMoments`
accumulates Σx, Σy, Σxxᵀ, Σyyᵀ, Σxyᵀ (float64) batch by batch, so no (n, D) feature matrix is ever held. The sums
are taken about the first batch's means (a shift), so centring at the end does not subtract two large numbers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class PairedMoments:
    """Streaming first and second moments of paired features x (B, Dx), y (B, Dy) of the same frames.

    ``update`` once per batch; then ``cka()``, ``mean_cosine()`` and the means. Sums live on the device of the first
    batch, in float64.
    """

    def __init__(self) -> None:
        self.n = 0
        self.cosine_sum = 0.0
        self._shift: tuple[Tensor, Tensor] | None = None
        self._sx = self._sy = self._xx = self._yy = self._xy = torch.zeros(0)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add a batch: x (B, Dx) and y (B, Dy), row b of each from the same frame."""
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"paired features must be (B, Dx) and (B, Dy), got {tuple(x.shape)}, {tuple(y.shape)}")
        if x.shape[0] == 0:
            return
        x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
        if self._shift is None:
            self._shift = (x.mean(0), y.mean(0))
            dx, dy = x.shape[1], y.shape[1]
            self._sx, self._sy = x.new_zeros(dx), y.new_zeros(dy)
            self._xx, self._yy, self._xy = x.new_zeros(dx, dx), y.new_zeros(dy, dy), x.new_zeros(dx, dy)
        xc, yc = x - self._shift[0], y - self._shift[1]  # (B, Dx), (B, Dy)
        self._sx += xc.sum(0)
        self._sy += yc.sum(0)
        self._xx += xc.T @ xc
        self._yy += yc.T @ yc
        self._xy += xc.T @ yc
        if x.shape[1] == y.shape[1]:
            self.cosine_sum += float(torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-12).sum())
        else:
            self.cosine_sum = math.nan  # features of different widths have no cosine
        self.n += x.shape[0]

    @property
    def mean_x(self) -> Tensor | None:
        """(Dx,) mean feature of the first model, None before any frame."""
        return None if self._shift is None else self._shift[0] + self._sx / self.n

    @property
    def mean_y(self) -> Tensor | None:
        """(Dy,) mean feature of the second model, None before any frame."""
        return None if self._shift is None else self._shift[1] + self._sy / self.n

    def cka(self) -> float | None:
        """Linear CKA in [0, 1]; None with fewer than two frames or a constant feature set (zero centred Gram)."""
        if self.n < 2:
            return None
        xx = self._xx - torch.outer(self._sx, self._sx) / self.n  # XᵀX of the centred X, (Dx, Dx)
        yy = self._yy - torch.outer(self._sy, self._sy) / self.n
        xy = self._xy - torch.outer(self._sx, self._sy) / self.n
        denominator = float(torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy))
        if not denominator > 0:
            return None
        return float(torch.linalg.matrix_norm(xy).square()) / denominator

    def mean_cosine(self) -> float | None:
        """Mean over frames of cos(x, y) (a zero feature vector counts 0); None before any frame or if Dx ≠ Dy."""
        if self.n == 0 or math.isnan(self.cosine_sum):
            return None
        return self.cosine_sum / self.n
