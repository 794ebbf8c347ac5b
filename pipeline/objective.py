"""What training optimises and reports, per task.

classification: cross-entropy on logits; validation loss and accuracy (train.py's `evaluate`).
regression: MSE or Huber on standardized targets (the model returns targets in their own units,
so the loss divides by the training targets' standard deviation: the same gradients as training
on standardized targets, whatever the units); validation loss, MAE, RMSE and R^2 (uniform average
over the outputs of a multi-step forecast), from sums that add up across DDP workers.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F


class Objective:
    def __init__(self, meta: dict[str, Any], loss: str = "mse", huber_delta: float = 1.0):
        self.regression = meta.get("task", "classification") == "regression"
        self.outputs = int(meta.get("num_outputs") or 1)
        target = meta.get("target_normalization")
        self.scale = torch.tensor(target["std"] if target else [1.0] * self.outputs,
                                  dtype=torch.float32).clamp_min(1e-12)
        self.kind, self.delta = loss, huber_delta

    def _elementwise(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(out.device)
        a, b = out / scale, y.view(out.shape).to(out.dtype) / scale
        if self.kind == "huber":
            return F.huber_loss(a, b, reduction="none", delta=self.delta)
        return F.mse_loss(a, b, reduction="none")

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean training loss of a batch."""
        if not self.regression:
            return F.cross_entropy(out, y)
        return self._elementwise(out, y).mean()

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict], device) -> list[float]:
        """Regression sums: [loss, count, |err|, err^2, sum y (per output), sum y^2 (per output),
        err^2 (per output)]; add them across workers, then `metrics`."""
        model.eval()
        h = self.outputs
        sums = torch.zeros(4 + 3 * h, dtype=torch.float64)
        for batch in batches:
            x = batch["x"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            out = model(x, batch["lengths"])
            y = y.view(out.shape).to(out.dtype)
            err = (out - y).double().cpu()
            yd = y.double().cpu()
            sums[0] += float(self._elementwise(out, y).mean(dim=1).sum())
            sums[1] += len(y)
            sums[2] += float(err.abs().sum())
            sums[3] += float((err ** 2).sum())
            sums[4:4 + h] += yd.sum(dim=0)
            sums[4 + h:4 + 2 * h] += (yd ** 2).sum(dim=0)
            sums[4 + 2 * h:] += (err ** 2).sum(dim=0)
        return sums.tolist()

    def metrics(self, sums: list[float]) -> dict[str, float]:
        """val_loss, val_mae, val_rmse, val_r2 from (all-reduced) `evaluate` sums."""
        h = self.outputs
        n = max(sums[1], 1.0)
        y_sum, y2_sum, sse = sums[4:4 + h], sums[4 + h:4 + 2 * h], sums[4 + 2 * h:]
        r2 = []
        for j in range(h):
            sst = y2_sum[j] - y_sum[j] ** 2 / n
            r2.append(1.0 - sse[j] / sst if sst > 0 else 0.0)
        return {"val_loss": sums[0] / n, "val_mae": sums[2] / (n * h),
                "val_rmse": math.sqrt(sums[3] / (n * h)), "val_r2": sum(r2) / h}
