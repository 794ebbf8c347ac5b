"""What differs between classification and regression, in one object per task.

    task = task_for(spec, cfg.train)                    # Classification or Regression
    loss = task.loss(model(x, lengths), y)              # the mean training loss of a batch
    sums = task.eval_sums(model, batches, device)       # float64 sums: add them across workers
    metrics = task.metrics(sums)                        # val_loss, val_accuracy | val_mae, ...
    columns = task.output_columns(module, x, lengths)   # batch predict's output columns

classification: integer class labels, cross-entropy on logits; validation loss, accuracy and the
confusion matrix [true, predicted], all from one vector of sums.
regression: float labels (a number, or a list of numbers per row), MSE or Huber on standardized
targets (the model returns targets in their own units, so the loss divides by the training
targets' standard deviation: the same gradients as training on standardized targets, whatever
the units); MAE, RMSE and R^2 (uniform average over the outputs of a multi-step forecast) from
sums that add across workers, and from the written predictions in the same way.
Nothing else in the pipeline branches on the task (the logged pyfunc model, which cannot import
this file, spells its two output layouts out itself).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline.model import ModelSpec, predict_proba, predict_values
from pipeline.report import log_confusion
from pipeline.shards import label_matrix, list_array


def confusion_counts(y: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """[true, predicted] counts of the rows whose label is a class index in [0, k)."""
    y = np.asarray(y).astype(np.int64)
    ok = (y >= 0) & (y < k)
    return np.bincount(y[ok] * k + np.asarray(predicted)[ok], minlength=k * k).reshape(k, k)


class Classification:
    name = "classification"
    metric_keys = ("val_loss", "val_accuracy")
    label_type = "long"

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.k = int(spec.num_outputs)

    def labels(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Class indices for a batch; ValueError when they are not integers in [0, k)."""
        labels = column.to_numpy(zero_copy_only=False)
        if labels.dtype.kind not in "iu" or (len(labels) and (labels.min() < 0 or labels.max() >= self.k)):
            raise ValueError(f"labels outside [0, {self.k}) or not integers")
        return labels.astype(np.int64)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    @torch.no_grad()
    def eval_sums(self, model, batches: Iterable[dict], device) -> torch.Tensor:
        """[loss sum, correct, count, confusion matrix (k x k, row-major)] as float64."""
        model.eval()
        sums = torch.zeros(3 + self.k * self.k, dtype=torch.float64)
        for batch in batches:
            y = batch["label"].to(device, non_blocking=True)
            logits = model(batch["x"].to(device, non_blocking=True), batch["lengths"])
            predicted = logits.argmax(dim=1)
            sums[0] += float(F.cross_entropy(logits, y, reduction="sum"))
            sums[1] += int((predicted == y).sum())
            sums[2] += len(y)
            sums[3:] += torch.from_numpy(confusion_counts(y.cpu().numpy(), predicted.cpu().numpy(),
                                                          self.k).reshape(-1)).double()
        return sums

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        n = max(float(sums[2]), 1.0)
        return {"val_loss": float(sums[0]) / n, "val_accuracy": float(sums[1]) / n}

    def count(self, sums: torch.Tensor) -> int:
        return int(sums[2])

    def confusion(self, sums: torch.Tensor) -> torch.Tensor:
        return sums[3:].round().to(torch.int64).view(self.k, self.k)

    def console(self, m: dict) -> str:
        return f"val_acc {m['val_accuracy']:.4f}"

    def summary(self, m: dict) -> str:
        return f"val accuracy:    {m['val_accuracy']:.4f} (best val_loss {m['val_loss']:.4f})"

    def output_columns(self, module, x: np.ndarray, lengths: np.ndarray,
                       device: str = "cpu") -> dict[str, pa.Array]:
        probs = predict_proba(module, x, lengths, device)
        pred = probs.argmax(axis=1).astype(np.int64)
        columns = {"prediction": pa.array(pred), "probabilities": list_array(probs)}
        if self.spec.class_names:
            columns["label_name"] = pa.array(np.asarray(self.spec.class_names, dtype=object)[pred])
        return columns

    def output_sums(self, labels: pa.Array, predictions: pa.Array) -> np.ndarray:
        """The confusion counts (row-major) of a batch of written predictions."""
        y = labels.to_numpy(zero_copy_only=False)
        return confusion_counts(y, predictions.to_numpy(zero_copy_only=False), self.k).reshape(-1)

    def output_metrics(self, sums: np.ndarray, mlc, run_id: str) -> dict[str, float]:
        """Accuracy and per-class precision/recall of a predict run, with the confusion matrix
        and per-class table logged as its artifacts."""
        names = list(self.spec.class_names) if self.spec.class_names else None
        return log_confusion(mlc, run_id, sums.reshape(self.k, self.k), names)

    def signature(self):
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Array, ColSpec, Schema

        outputs = [ColSpec("long", "prediction"), ColSpec(Array("float"), "probabilities")]
        if self.spec.class_names:
            outputs.append(ColSpec("string", "label_name"))
        return ModelSignature(inputs=Schema([ColSpec(Array(Array("double")), "features")]),
                              outputs=Schema(outputs))


class Regression:
    name = "regression"
    metric_keys = ("val_loss", "val_mae", "val_rmse", "val_r2")
    label_type = "double"

    def __init__(self, spec: ModelSpec, loss: str = "mse", huber_delta: float = 1.0):
        self.spec = spec
        self.h = int(spec.num_outputs)
        target = spec.target_normalization
        self.scale = torch.tensor(target.std if target else [1.0] * self.h,
                                  dtype=torch.float32).clamp_min(1e-12)
        self.kind, self.delta = loss, huber_delta

    def labels(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Targets [rows, outputs] as float32; ValueError for missing or non-finite ones."""
        try:
            labels = label_matrix(column).astype(np.float32)
        except pa.ArrowInvalid as exc:
            raise ValueError(str(exc)) from None
        if not np.isfinite(labels).all():
            raise ValueError("null, NaN or inf labels")
        return labels

    def _elementwise(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(out.device)
        a, b = out / scale, y.view(out.shape).to(out.dtype) / scale
        if self.kind == "huber":
            return F.huber_loss(a, b, reduction="none", delta=self.delta)
        return F.mse_loss(a, b, reduction="none")

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._elementwise(out, y).mean()

    @staticmethod
    def error_sums(predicted: np.ndarray, y: np.ndarray) -> np.ndarray:
        """[count, |err|, err^2, sum y (per output), sum y^2 (per output), err^2 (per output)]."""
        err = predicted.astype(np.float64) - y.astype(np.float64)
        y = y.astype(np.float64)
        return np.concatenate([[len(y), np.abs(err).sum(), (err ** 2).sum()], y.sum(axis=0),
                               (y ** 2).sum(axis=0), (err ** 2).sum(axis=0)])

    def error_metrics(self, sums: np.ndarray) -> dict[str, float]:
        """MAE, RMSE and R^2 from (added) error_sums."""
        h = self.h
        n = max(float(sums[0]), 1.0)
        y_sum, y2_sum, sse = sums[3:3 + h], sums[3 + h:3 + 2 * h], sums[3 + 2 * h:]
        sst = y2_sum - y_sum ** 2 / n
        r2 = np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), 0.0)
        return {"mae": float(sums[1]) / (n * h), "rmse": math.sqrt(float(sums[2]) / (n * h)),
                "r2": float(r2.mean())}

    @torch.no_grad()
    def eval_sums(self, model, batches: Iterable[dict], device) -> torch.Tensor:
        """[loss sum, error_sums...] as float64."""
        model.eval()
        sums = np.zeros(1 + 3 + 3 * self.h)
        for batch in batches:
            out = model(batch["x"].to(device, non_blocking=True), batch["lengths"])
            y = batch["label"].to(device, non_blocking=True).view(out.shape).to(out.dtype)
            sums[0] += float(self._elementwise(out, y).mean(dim=1).sum())
            sums[1:] += self.error_sums(out.cpu().numpy(), y.cpu().numpy())
        return torch.from_numpy(sums)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        sums = sums.numpy()
        n = max(float(sums[1]), 1.0)
        return {"val_loss": float(sums[0]) / n} | {
            f"val_{k}": v for k, v in self.error_metrics(sums[1:]).items()}

    def count(self, sums: torch.Tensor) -> int:
        return int(sums[1])

    def confusion(self, sums: torch.Tensor) -> None:
        return None

    def console(self, m: dict) -> str:
        return f"val_rmse {m['val_rmse']:.4f}  val_r2 {m['val_r2']:.4f}"

    def summary(self, m: dict) -> str:
        return (f"val RMSE:        {m['val_rmse']:.4f}  MAE {m['val_mae']:.4f}  R2 {m['val_r2']:.4f} "
                f"(best val_loss {m['val_loss']:.4f})")

    def output_columns(self, module, x: np.ndarray, lengths: np.ndarray,
                       device: str = "cpu") -> dict[str, pa.Array]:
        """prediction: a double, or list<double> for a multi-step forecast."""
        values = predict_values(module, x, lengths, device).astype(np.float64)
        return {"prediction": pa.array(values[:, 0]) if self.h == 1 else list_array(values)}

    def output_sums(self, labels: pa.Array, predictions: pa.Array) -> np.ndarray:
        """error_sums of a batch of written predictions."""
        return self.error_sums(label_matrix(predictions), label_matrix(labels))

    def output_metrics(self, sums: np.ndarray, mlc, run_id: str) -> dict[str, float]:
        """MAE, RMSE and R^2 of a predict run."""
        return self.error_metrics(sums) if sums[0] else {}

    def signature(self):
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Array, ColSpec, Schema

        output = ColSpec("double", "prediction") if self.h == 1 else ColSpec(Array("double"), "prediction")
        return ModelSignature(inputs=Schema([ColSpec(Array(Array("double")), "features")]),
                              outputs=Schema([output]))


Task = Classification | Regression


def task_for(spec: ModelSpec, train=None) -> Task:
    """The task object of a model; `train` (OptimConfig) picks the regression loss."""
    if spec.regression:
        return Regression(spec, getattr(train, "loss", "mse"), getattr(train, "huber_delta", 1.0))
    return Classification(spec)
