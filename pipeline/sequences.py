"""One part of a table of readings, sorted, checked and turned into sequence rows or forecasting
windows (`data prepare`'s third pass; pipeline/prepare.py runs the passes).

Vectorised with pyarrow compute and NumPy: the run boundaries of the sorted ids give each
sequence's rows; no Python loop over rows or sequences.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import DataError
from pipeline.shards import list_array, sequence_array

if TYPE_CHECKING:
    from pipeline.prepare import PrepareSpec


def _show(value: Any) -> str:
    return repr(value.as_py() if isinstance(value, pa.Scalar) else value)


def _boundaries(ids: pa.Array) -> np.ndarray:
    """Start row of each sequence in rows sorted by id, plus the end."""
    n = len(ids)
    if n == 0:
        return np.array([0], dtype=np.int64)
    change = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(change) + 1, [n]]).astype(np.int64)


def _features_matrix(table: pa.Table, cols: list[str], spec: PrepareSpec,
                     where: str) -> tuple[pa.Table, np.ndarray]:
    """The feature values [rows, F] float32 after the missing-value policy (rows may drop)."""
    cols_np, valid = [], np.ones(table.num_rows, dtype=bool)
    missing = {}
    for c in cols:
        arr = table.column(c).combine_chunks() if table.num_rows else pa.array([], pa.float64())
        values = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
        bad = ~np.isfinite(values)
        if bad.any():
            missing[c] = bad
        valid &= ~bad
        cols_np.append(values)
    x = np.column_stack(cols_np) if cols_np else np.zeros((table.num_rows, 0))
    if missing:
        if spec.missing == "error":
            col, bad = next(iter(missing.items()))
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"column {col!r} in {where} has {int(bad.sum())} missing values (null, NaN or inf; "
                f"first at {spec.id_col}={_show(table.column(spec.id_col)[row])}, "
                f"{spec.time_col}={_show(table.column(spec.time_col)[row])}): pass --missing ffill "
                "to carry each sequence's last reading forward or --missing drop to drop those rows")
        if spec.missing == "ffill":
            bounds = _boundaries(table.column(spec.id_col).combine_chunks())
            seq_start = np.repeat(bounds[:-1], np.diff(bounds))
            filled = np.empty_like(x)
            keep = np.ones(len(x), dtype=bool)
            for j in range(x.shape[1]):  # a loop over feature columns, vectorised over rows
                ok = np.isfinite(x[:, j])
                last = np.maximum.accumulate(np.where(ok, np.arange(len(x)), -1))
                has = last >= seq_start
                filled[:, j] = x[np.where(has, last, 0), j]
                keep &= has
            x = filled
            valid = keep
        table, x = table.filter(pa.array(valid)), x[valid]
    return table, x.astype(np.float32)


def build_part(table: pa.Table, spec: PrepareSpec, features: list[str], label_kind: str | None,
                names: list[str] | None, where: str) -> pa.Table:
    """One part's rows -> sequence rows (or forecasting windows), after every check."""
    id_col, time_col = spec.id_col, spec.time_col
    if table.column(time_col).null_count:
        raise DataError(f"--time-col: column {time_col!r} in {where} has missing times: every "
                        "reading needs its time step; fill or drop those rows")
    table = table.sort_by([(id_col, "ascending"), (time_col, "ascending")])
    ids = table.column(id_col).combine_chunks()
    times = table.column(time_col).combine_chunks()
    n = table.num_rows
    if n > 1:
        same_id = pc.equal(ids.slice(1), ids.slice(0, n - 1))
        dup = pc.and_(same_id, pc.equal(times.slice(1), times.slice(0, n - 1)))
        if pc.any(dup).as_py():
            i = int(np.flatnonzero(dup.to_numpy(zero_copy_only=False))[0])
            count = int(pc.sum(dup).as_py())
            raise DataError(
                f"{where}: duplicate ({id_col}, {time_col}) pair {id_col}={_show(ids[i])}, "
                f"{time_col}={_show(times[i])} ({count} duplicate rows in all): keep one reading "
                "per sequence and time step (drop or aggregate the others)")
        if spec.label_col:
            lab = table.column(spec.label_col).combine_chunks()
            if lab.null_count:
                raise DataError(f"--label-col: column {spec.label_col!r} in {where} has missing "
                                "labels: every reading needs its sequence's label")
            varies = pc.and_(same_id, pc.not_equal(lab.slice(1), lab.slice(0, n - 1)))
            if pc.any(varies).as_py():
                i = int(np.flatnonzero(varies.to_numpy(zero_copy_only=False))[0])
                raise DataError(
                    f"--label-col: column {spec.label_col!r} in {where} varies within sequence "
                    f"{id_col}={_show(ids[i])} ({_show(lab[i])} then {_show(lab[i + 1])}): a label "
                    "belongs to a whole sequence; fix the labels or split the sequence under new ids")
    cols = features + ([spec.target_col] if spec.window and spec.target_col not in features else [])
    table, x = _features_matrix(table, cols, spec, where)
    ids = table.column(id_col).combine_chunks()
    bounds = _boundaries(ids)
    starts = bounds[:-1]
    width = len(features)
    if spec.window is None:
        out = {"id": ids.take(pa.array(starts)), "features": sequence_array(x[:, :width], bounds)}
        if spec.label_col:
            lab = table.column(spec.label_col).combine_chunks().take(pa.array(starts))
            if label_kind == "names":
                if pa.types.is_dictionary(lab.type):
                    lab = lab.cast(lab.type.value_type)
                lab = pc.index_in(lab.cast(pa.string()), value_set=pa.array(names)).cast(pa.int64())
            elif label_kind == "index":
                lab = lab.cast(pa.int64())
            else:
                lab = lab.cast(pa.float32())
            out["label"] = lab
        return pa.table(out)
    # Forecasting windows: start s is valid when s .. s+L+H-1 lie in one series.
    L, H = spec.window, spec.horizon
    target = x[:, cols.index(spec.target_col)]
    series_end = np.repeat(bounds[1:], np.diff(bounds))  # exclusive end of each row's series
    series_start = np.repeat(bounds[:-1], np.diff(bounds))
    s = np.arange(len(x))
    ok = (s + L + H <= series_end) & ((s - series_start) % spec.stride == 0)
    s = s[ok]
    steps = x[:, :width][(s[:, None] + np.arange(L)).reshape(-1)]
    label = target[s[:, None] + L + np.arange(H)].astype(np.float32)
    out = {
        "id": ids.take(pa.array(s)),
        "end_time": table.column(time_col).combine_chunks().take(pa.array(s + L - 1)),
        "features": sequence_array(steps, np.arange(0, (len(s) + 1) * L, L)),
        "label": pa.array(label[:, 0]) if H == 1 else list_array(label),
    }
    return pa.table(out)
