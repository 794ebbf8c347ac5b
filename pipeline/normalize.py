"""Per-feature (and regression target) statistics of the training split, in one streaming pass.

Each training worker computes them over its own shard before its first epoch (`shard_statistics`,
the same pass that fills its shard cache, so small data is read once), and the workers' partial
moments are merged exactly: count, mean and sum of squared deviations per feature over all valid
time steps, combined with Chan et al.'s parallel update, so the result equals numpy's mean and
population std (ddof=0) over the split without holding it. With a `val_fraction` split, the pass
reads the already-split training rows, so validation rows never contribute.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import DataError
from pipeline.model import pad_arrow
from pipeline.shards import CHECK_HINT, label_matrix


def _moments(values: np.ndarray) -> tuple[int, list[float], list[float]]:
    n = len(values)
    if n == 0:
        return 0, [0.0] * values.shape[1], [0.0] * values.shape[1]
    mean = values.mean(axis=0)
    return n, mean.tolist(), ((values - mean) ** 2).sum(axis=0).tolist()


def batch_moments(batch: pa.Table, features_column: str, label_column: str | None,
                  n_features: int) -> pa.Table:
    """One batch's partial moments (a one-row table), or the reason the batch is bad (`error`):
    bad values must not become NaN statistics; the driver raises the same error training would."""
    try:
        x, lengths, width = pad_arrow(batch.column(features_column))
        if len(lengths) and width != n_features:
            raise ValueError(f"a batch has {width} features per step, expected {n_features}")
        mask = np.arange(x.shape[1])[None, :] < lengths[:, None]
        n, mean, m2 = _moments(x[mask].astype(np.float64))
        row = {"n": [n], "mean": [mean], "m2": [m2], "error": pa.array([None], pa.string())}
        if label_column is not None:
            y = label_matrix(batch.column(label_column))
            if not np.isfinite(y).all():
                raise ValueError("null, NaN or inf labels")
            ln, lmean, lm2 = _moments(y)
            row |= {"ln": [ln], "lmean": [lmean], "lm2": [lm2]}
    except ValueError as exc:
        row = {"n": [0], "mean": [[0.0] * n_features], "m2": [[0.0] * n_features],
               "error": [str(exc)]}
        if label_column is not None:
            row |= {"ln": [0], "lmean": [[0.0]], "lm2": [[0.0]]}
    return pa.table(row)


def combine(parts) -> tuple[int, np.ndarray, np.ndarray] | None:
    """Exact merge of partial (count, mean, M2) into one (count, mean, M2); None when empty."""
    n, mean, m2 = 0, None, None
    for nb, mb, m2b in parts:
        if nb == 0:
            continue
        mb, m2b = np.asarray(mb, dtype=np.float64), np.asarray(m2b, dtype=np.float64)
        if mean is None:
            n, mean, m2 = nb, mb, m2b
            continue
        total = n + nb
        delta = mb - mean
        mean = mean + delta * nb / total
        m2 = m2 + m2b + delta ** 2 * n * nb / total
        n = total
    return None if mean is None else (n, mean, m2)


def merge(parts) -> dict[str, Any] | None:
    """Partial (count, mean, M2) -> {"mean", "std", "count"} (population std; 1 where it is 0)."""
    combined = combine(parts)
    if combined is None:
        return None
    n, mean, m2 = combined
    std = np.sqrt(m2 / n)
    return {"mean": mean.tolist(), "std": np.where(std > 0, std, 1.0).tolist(), "count": int(n)}


def shard_statistics(windows, features_column: str, label_column: str | None, n_features: int,
                     gather) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(feature statistics, target statistics or None) over every worker's windows of its shard.
    `gather(obj)` returns every worker's obj in rank order (all_gather_object), so every worker
    merges the same parts in the same order and gets the same statistics, to the last bit."""
    parts, targets = [], []
    for table in windows:
        row = batch_moments(table, features_column, label_column, n_features).to_pylist()[0]
        if row["error"]:
            raise DataError(f"bad training data: {row['error']}: {CHECK_HINT}")
        parts.append((row["n"], row["mean"], row["m2"]))
        if label_column is not None:
            targets.append((row["ln"], row["lmean"], row["lm2"]))
    everyone = gather((combine(parts), combine(targets)))
    features = merge([m[0] for m in everyone if m[0] is not None])
    target = merge([m[1] for m in everyone if m[1] is not None]) if label_column else None
    return features, target
