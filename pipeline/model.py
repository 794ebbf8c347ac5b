"""The model: what defines it (ModelSpec), the LSTM, padding Arrow batches, the MLflow pyfunc.

This file is self-contained on purpose (torch, numpy, pyarrow, pandas, mlflow; nothing from this
package): it is logged with every model as MLflow "model from code", so a logged model loads with
`mlflow.pyfunc.load_model(uri)` wherever those libraries are installed, without `pipeline` on the
path and without unpickling any of our classes.

Two details of the classic LSTM classifier matter for padded batches: the head reads each
sequence's last *valid* step (reading `out[:, -1]` would read padding for every shorter
sequence; see `LSTMClassifier.forward`), and nn.LSTM makes its zero initial states itself, on
the input's device and dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


@dataclass(frozen=True)
class Moments:
    """Per-column mean and (population) standard deviation over the training split."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    count: int = 0

    @classmethod
    def from_dict(cls, d: dict | None) -> Moments | None:
        if d is None:
            return None
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]),
                   int(d.get("count", 0)))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "count": self.count}


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines a trained network besides its weights. Saved as `meta.json` with
    every logged model and under "meta" in every checkpoint (`to_dict`: the same layout since the
    first release, so older models and checkpoints load)."""

    n_features: int
    num_outputs: int
    """Classes (classification) or target values per row (regression)."""
    task: str = "classification"
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0
    bidirectional: bool = False
    features_column: str = "features"
    class_names: tuple[str, ...] | None = None
    normalization: Moments | None = None
    """Input features' statistics; every step is standardized with them inside the model."""
    target_normalization: Moments | None = None
    """Regression targets' statistics: the head predicts standardized targets."""

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    @property
    def num_classes(self) -> int | None:
        return None if self.regression else self.num_outputs

    def replace(self, **changes) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names) if self.class_names else None,
            "features_column": self.features_column,
            "model": {"hidden_size": self.hidden_size, "num_layers": self.num_layers,
                      "dropout": self.dropout, "bidirectional": self.bidirectional,
                      "task": self.task},
            "normalization": self.normalization.to_dict() if self.normalization else None,
            "task": self.task,
            "num_outputs": self.num_outputs if self.regression else 1,
            "target_normalization": (self.target_normalization.to_dict()
                                     if self.target_normalization else None),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        arch = d["model"]
        task = d.get("task", arch.get("task", "classification"))
        regression = task == "regression"
        return cls(
            n_features=int(d["n_features"]),
            num_outputs=int(d["num_outputs"] if regression else d["num_classes"]),
            task=task, hidden_size=int(arch["hidden_size"]), num_layers=int(arch["num_layers"]),
            dropout=float(arch["dropout"]), bidirectional=bool(arch["bidirectional"]),
            features_column=d.get("features_column", "features"),
            class_names=tuple(d["class_names"]) if d.get("class_names") else None,
            normalization=Moments.from_dict(d.get("normalization")),
            target_normalization=Moments.from_dict(d.get("target_normalization")),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls.from_dict(json.loads(text))


class LSTMClassifier(nn.Module):
    """nn.LSTM over padded batches -> nn.Linear on each sequence's last valid step."""

    def __init__(
        self,
        n_features: int,
        num_classes: int,
        hidden_size: int = 64,
        num_layers: int = 1,
        dropout: float = 0.0,
        bidirectional: bool = False,
        normalization: dict[str, list[float]] | None = None,
        target: dict[str, list[float]] | None = None,
    ):
        """`normalization`: {"mean", "std"} per feature, applied to every input step.
        `target`: {"mean", "std"} per output for regression: the head predicts the standardized
        target and forward() returns it in the target's units."""
        super().__init__()
        self.lstm = nn.LSTM(
            input_size=n_features,
            hidden_size=hidden_size,
            num_layers=num_layers,
            # nn.LSTM applies dropout between layers only; it warns when there is one layer.
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=bidirectional,
            batch_first=True,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)
        # Per-feature normalization and (regression) target scaling, from the training split's
        # statistics in the model metadata; not in the state dict (the metadata is their source),
        # so models trained without them load as before.
        self.normalize = normalization is not None
        if normalization is not None:
            mean = torch.tensor(normalization["mean"], dtype=torch.float32)
            std = torch.tensor(normalization["std"], dtype=torch.float32)
            self.register_buffer("feature_mean", mean, persistent=False)
            self.register_buffer("feature_scale", 1.0 / torch.where(std > 0, std, torch.ones_like(std)),
                                 persistent=False)
        self.regression = target is not None
        if target is not None:
            self.register_buffer("target_mean", torch.tensor(target["mean"], dtype=torch.float32),
                                 persistent=False)
            self.register_buffer("target_std", torch.tensor(target["std"], dtype=torch.float32),
                                 persistent=False)
        # Start the forget gates open (bias 1, as Keras' unit_forget_bias does; Jozefowicz et al.
        # 2015) so the cell state carries information over long sequences from the first steps
        # of training. PyTorch's gate order in the bias is input, forget, cell, output.
        with torch.no_grad():
            for name, param in self.lstm.named_parameters():
                if name.startswith("bias_ih"):
                    param[hidden_size:2 * hidden_size].fill_(1.0)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x: [batch, time, features] zero-padded; lengths: [batch] valid steps. Returns logits
        (classification) or predictions in the target's units [batch, outputs] (regression).

        Only each sequence's valid steps reach its prediction; two ways, the same result:
        - CUDA: the batch is packed and cuDNN runs every sequence to its own length.
        - CPU: the padded batch runs dense and each row is read at its last valid step. A step's
          output depends only on the steps before it, so padding *after* a sequence cannot reach
          that read. (PyTorch's CPU kernels for packed input with varying lengths are the native
          per-step loop, whose backward zero-fills the whole packed input once per time step:
          measured 5-8x slower than the dense oneDNN kernel on skewed lengths.) The backward
          direction of a bidirectional LSTM reads each sequence reversed within its own length.
        """
        if self.normalize:
            # Padding steps change too, but no valid step reads them.
            x = (x - self.feature_mean) * self.feature_scale
        if x.is_cuda:
            summary = self._summary_packed(x, lengths)
        elif self.lstm.bidirectional:
            summary = self._summary_dense_bidirectional(x, lengths)
        else:
            out, _ = self.lstm(x)
            last = lengths.to(x.device, torch.int64) - 1
            summary = out[torch.arange(len(x), device=x.device), last]
        out = self.head(self.dropout(summary))
        if self.regression:
            out = out * self.target_std + self.target_mean
        return out

    def _summary_packed(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # pack_padded_sequence wants the lengths on the CPU whatever the device of x.
        packed = pack_padded_sequence(
            x, lengths.detach().to("cpu", torch.int64), batch_first=True, enforce_sorted=False
        )
        _, (h_n, _) = self.lstm(packed)
        # h_n: [layers * directions, batch, hidden], already in the input's batch order. For the
        # forward direction it is the state at each sequence's last valid step; for the backward
        # direction it is the state after reading the whole sequence back to step 0.
        if self.lstm.bidirectional:
            return torch.cat([h_n[-2], h_n[-1]], dim=1)
        return h_n[-1]

    def _summary_dense_bidirectional(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Layer by layer: the forward direction over the padded batch, the backward direction
        over each row reversed within its valid steps (padding stays after them), both with the
        weights of `self.lstm`; the same values as the packed path."""
        lstm = self.lstm
        batch, steps = x.shape[0], x.shape[1]
        last = lengths.to(x.device, torch.int64) - 1
        t = torch.arange(steps, device=x.device)
        # reverse[b, t]: the step that lands at t when row b is read backwards; it is its own
        # inverse, so the same gather also puts backward outputs back in time order.
        reverse = torch.where(t[None, :] <= last[:, None], last[:, None] - t[None, :], t[None, :])

        def flip(seq: torch.Tensor) -> torch.Tensor:
            return seq.gather(1, reverse.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))

        rows = torch.arange(batch, device=x.device)
        h0 = x.new_zeros(1, batch, lstm.hidden_size)
        inp = x
        for layer in range(lstm.num_layers):
            fwd, bwd = (torch.lstm(seq, (h0, h0), self._layer_weights(layer, suffix), lstm.bias,
                                   1, 0.0, self.training, False, True)[0]
                        for seq, suffix in ((inp, ""), (flip(inp), "_reverse")))
            if layer == lstm.num_layers - 1:
                # bwd at a row's last reversed step is the state after reading back to step 0.
                return torch.cat([fwd[rows, last], bwd[rows, last]], dim=1)
            inp = torch.cat([fwd, flip(bwd)], dim=2)
            if lstm.dropout and self.training:  # nn.LSTM's dropout between layers
                inp = nn.functional.dropout(inp, lstm.dropout, True)
        raise AssertionError("unreachable: an LSTM has at least one layer")

    def _layer_weights(self, layer: int, suffix: str) -> list[torch.Tensor]:
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.lstm.bias else [])
        return [getattr(self.lstm, f"{name}_l{layer}{suffix}") for name in names]


def build_model(spec: ModelSpec) -> LSTMClassifier:
    """The network a spec describes (weights freshly initialised)."""
    target = spec.target_normalization or Moments((0.0,) * spec.num_outputs, (1.0,) * spec.num_outputs)
    return LSTMClassifier(
        n_features=spec.n_features,
        num_classes=spec.num_outputs,
        normalization=spec.normalization.to_dict() if spec.normalization else None,
        target=target.to_dict() if spec.regression else None,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        dropout=spec.dropout,
        bidirectional=spec.bidirectional,
    )


def pad_arrow(features: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, int]:
    """Arrow `list<list<float>>` (or fixed-size lists) -> zero-padded [B, T, F] float32 + lengths.

    Vectorised: the values are flattened once (no per-row Python) and scattered into the padded
    array with a boolean mask, which visits steps in the same row-major order as the values.
    Raises ValueError with a plain-language reason when the data cannot be a sequence batch.
    """
    if isinstance(features, pa.ChunkedArray):
        features = features.combine_chunks()
    if features.null_count:
        raise ValueError("null sequences (features is null in some rows)")
    lengths = pc.list_value_length(features).to_numpy(zero_copy_only=False).astype(np.int64)
    steps = features.flatten()
    if not (pa.types.is_list(steps.type) or pa.types.is_large_list(steps.type)
            or pa.types.is_fixed_size_list(steps.type)):
        raise ValueError(f"features must be a list of lists (time-major), got {features.type}")
    if steps.null_count:
        raise ValueError("null time steps inside some sequences")
    widths = pc.list_value_length(steps).to_numpy(zero_copy_only=False)
    batch = len(lengths)
    n_features = int(widths[0]) if len(widths) else 0
    if len(widths) and (widths != n_features).any():
        bad = int(np.flatnonzero(widths != n_features)[0])
        row = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        raise ValueError(
            f"inconsistent n_features: row {row} has a step with {int(widths[bad])} features, "
            f"others have {n_features}"
        )
    values = steps.flatten()
    if values.null_count:
        raise ValueError("null feature values")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if not np.isfinite(flat).all():
        where = int(np.flatnonzero(~np.isfinite(flat))[0]) // max(n_features, 1)
        row = int(np.searchsorted(np.cumsum(lengths), where, side="right"))
        raise ValueError(f"NaN or inf feature values (first in row {row} of the batch)")
    if batch and lengths.min() == 0:
        row = int(np.flatnonzero(lengths == 0)[0])
        raise ValueError(f"zero-length sequence in row {row} of the batch")
    max_len = int(lengths.max()) if batch else 0
    out = np.zeros((batch, max_len, n_features), dtype=np.float32)
    if batch:
        mask = np.arange(max_len)[None, :] < lengths[:, None]
        out[mask] = flat.reshape(-1, n_features)
    return out, lengths, n_features


def _features_to_arrow(column: pd.Series) -> pa.Array:
    """A pandas column of sequences (lists of lists or 2-D arrays) -> Arrow list<list<float32>>."""
    rows = [list(v) if isinstance(v, np.ndarray) and v.ndim == 2 else v for v in column]
    return pa.array(rows, type=pa.list_(pa.list_(pa.float32())))


@torch.inference_mode()
def predict_proba(module: nn.Module, x: np.ndarray, lengths: np.ndarray,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Class probabilities [B, C] (float32) for a padded float32 batch."""
    logits = module(torch.from_numpy(x).to(device, non_blocking=True), torch.from_numpy(lengths))
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


@torch.inference_mode()
def predict_values(module: nn.Module, x: np.ndarray, lengths: np.ndarray,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """Regression predictions [B, outputs] (float32, in the target's units) for a padded batch."""
    out = module(torch.from_numpy(x).to(device, non_blocking=True), torch.from_numpy(lengths))
    return out.float().cpu().numpy()


@functools.cache
def pyfunc_class() -> type:
    """The MLflow pyfunc wrapper class, built on first use so that importing this module (as
    training workers and predict actors do) does not pay for importing MLflow."""
    import mlflow.pyfunc

    class LSTMPyfunc(mlflow.pyfunc.PythonModel):
        """DataFrame with a `features` column -> prediction, probabilities[, label_name]
        (classification) or prediction: float, or list of floats for a multi-step forecast
        (regression)."""

        def load_context(self, context) -> None:
            with open(context.artifacts["meta"]) as fh:
                self.spec = ModelSpec.from_json(fh.read())
            self.module = build_model(self.spec)
            state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
            self.module.load_state_dict(state)
            self.module.eval()

        def predict_padded(self, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
            """Class probabilities for a padded batch; the fast path for batch jobs."""
            return predict_proba(self.module, x, lengths)

        def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
            spec = self.spec
            if spec.features_column not in model_input.columns:
                raise ValueError(f"input has no {spec.features_column!r} column (columns: "
                                 f"{list(model_input.columns)})")
            x, lengths, n_features = pad_arrow(_features_to_arrow(model_input[spec.features_column]))
            if len(lengths) and n_features != spec.n_features:
                raise ValueError(f"input has {n_features} features per step, the model was "
                                 f"trained on {spec.n_features}")
            # The pipeline's own outputs come from pipeline/task.py; a logged model cannot import
            # it, so the two output layouts are spelled out here too.
            if spec.regression:
                values = predict_values(self.module, x, lengths).astype(np.float64)
                pred = values[:, 0] if values.shape[1] == 1 else list(values)
                return pd.DataFrame({"prediction": pred})
            probs = self.predict_padded(x, lengths)
            pred = probs.argmax(axis=1).astype(np.int64)
            out = pd.DataFrame({"prediction": pred, "probabilities": list(probs.astype(np.float32))})
            if spec.class_names:
                out["label_name"] = [spec.class_names[i] for i in pred]
            return out

    return LSTMPyfunc


# MLflow loads a logged model by executing this file as a fresh module ("model from code"); the
# model object it serves is the one registered here. Importing `pipeline.model` registers nothing.
if __name__ != "pipeline.model":
    import mlflow.models

    mlflow.models.set_model(pyfunc_class()())
