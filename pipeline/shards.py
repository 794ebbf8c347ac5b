"""Parquet sequence shards on disk or object storage: find them, check them, summarise them.

Shard format (one row per sequence):
    features  list<list<float32>>  time-major, [length, n_features] (fixed_size_list also accepted)
    label     integer              class index in [0, num_classes)
              (model.task=regression: float, or list<float> of the same length in every row)
    id        any scalar, optional carried to predictions

Validation happens on the driver before any cluster work and never reads a dataset whole: every
file's schema and metadata are checked, plus the values of a bounded sample of rows per file. The
rest of the values are checked as the workers collate each batch (same rules, same wording).
`lstm-pipeline data check PATH` scans every row, one record batch at a time. Reading shards with
Ray Data and collating batches is pipeline/data.py.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.errors import DataError, collect
from pipeline.model import pad_arrow
from pipeline.storage import absolute, filesystem, is_uri

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
CHECK_HINT = "run `lstm-pipeline data check PATH` to find the file and row"


# --------------------------------------------------------------------------- paths


def list_shards(paths: str | list[str], what: str = "data") -> list[str]:
    """Expand directories, globs and files (local or URI) into a sorted list of Parquet files."""
    items = [paths] if isinstance(paths, str) else list(paths)
    if not items:
        raise DataError(f"{what}: no path given: set the path to a directory of Parquet shards")
    files: list[str] = []
    problems: list[str] = []
    for item in items:
        if is_uri(item):
            fs, root = pafs.FileSystem.from_uri(item)
            prefix = urlparse(item).scheme + "://"
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.NotFound:
                problems.append(f"{what}: {item} does not exist")
            elif info.type == pafs.FileType.File:
                files.append(item)
            else:
                found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
                files += [prefix + f.path for f in found if f.type == pafs.FileType.File
                          and _is_shard_name(f.base_name)]
            continue
        local = absolute(item)
        if any(ch in item for ch in "*?["):
            matched = sorted(p for p in glob.glob(local, recursive=True) if os.path.isfile(p))
            if not matched:
                problems.append(f"{what}: the pattern {item} matches no files")
            files += matched
        elif os.path.isdir(local):
            found, stray = [], []
            for root, dirs, names in os.walk(local):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
                for name in sorted(names):
                    if name.startswith((".", "_")):
                        continue
                    (found if _is_shard_name(name) else stray).append(os.path.join(root, name))
            if stray:
                problems.append(
                    f"{what}: {stray[0]} is not a Parquet file (name ends in none of "
                    f"{', '.join(PARQUET_SUFFIXES)}): move it out of {item} or point at the shards"
                )
            if not found and not stray:
                problems.append(f"{what}: directory {item} holds no Parquet files: "
                                "write shards there first (e.g. `lstm-pipeline data synth`)")
            files += found
        elif os.path.isfile(local):
            files.append(local)
        else:
            problems.append(f"{what}: {item} does not exist: check the path "
                            "(relative paths are read from the current directory)")
    collect(problems, DataError)
    return sorted(dict.fromkeys(files))


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(PARQUET_SUFFIXES) and not name.startswith((".", "_"))


# --------------------------------------------------------------------------- columns


def label_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A scalar or list<number> label column -> float64 [rows, outputs]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) \
            or pa.types.is_fixed_size_list(column.type):
        widths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        width = int(widths[0]) if len(widths) else 1
        if len(widths) and (widths != width).any():
            raise ValueError(f"labels of different lengths ({width} and "
                             f"{int(widths[widths != width][0])}): every row needs the same "
                             "number of target values")
        values = column.flatten().cast(pa.float64()).to_numpy(zero_copy_only=False)
        return values.reshape(len(column), width)
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False).reshape(-1, 1)


def list_array(values: np.ndarray) -> pa.ListArray:
    """[rows, width] -> list<...>: one list of `width` values per row."""
    n, width = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32)),
                                    pa.array(values.reshape(-1)))


def sequence_array(steps: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    """Time steps [total steps, F] and each sequence's first step (plus the end) ->
    list<list<...>>: the shard format's features column."""
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), list_array(steps))


# --------------------------------------------------------------------------- validation


@dataclass
class DatasetInfo:
    """What validation learned about one dataset (train or validation)."""

    files: list[str]
    rows: int
    n_features: int | None
    label_min: int | None
    label_max: int | None
    problems: list[str] = field(default_factory=list)
    length_counts: dict[int, int] = field(default_factory=dict)
    """Sequences per length, over the rows whose values were read."""
    class_counts: dict[int, int] = field(default_factory=dict)
    """Rows per label (full scans only)."""
    num_outputs: int | None = None
    """Regression: numbers per label (1 for a scalar label)."""

    def length_percentiles(self, qs=(50, 90, 99, 100)) -> dict[int, int]:
        if not self.length_counts:
            return {}
        keys = np.array(sorted(self.length_counts))
        cum = np.cumsum([self.length_counts[k] for k in keys])
        return {q: int(keys[np.searchsorted(cum, q / 100 * cum[-1])]) for q in qs}


def _add_counts(counts: dict[int, int], values: np.ndarray) -> None:
    uniq, n = np.unique(values, return_counts=True)
    for k, c in zip(uniq.tolist(), n.tolist()):
        counts[k] = counts.get(k, 0) + c


def open_parquet(path: str) -> pq.ParquetFile:
    fs, inner = filesystem(path)
    return pq.ParquetFile(fs.open_input_file(inner))


def _nested_depth_ok(tp: pa.DataType) -> tuple[bool, int | None]:
    """(is list-of-list-of-numbers, fixed inner width if the schema says so)."""
    listy = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    if not any(f(tp) for f in listy):
        return False, None
    inner = tp.value_type
    if not any(f(inner) for f in listy):
        return False, None
    leaf = inner.value_type
    if not (pa.types.is_floating(leaf) or pa.types.is_integer(leaf)):
        return False, None
    return True, inner.list_size if pa.types.is_fixed_size_list(inner) else None


def _is_number_or_numbers(tp: pa.DataType) -> bool:
    if pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
        tp = tp.value_type
    return pa.types.is_floating(tp) or pa.types.is_integer(tp)


def check_schema(path: str, schema: pa.Schema, features_column: str, label_column: str | None,
                 regression: bool = False) -> list[str]:
    """Problems with one file's schema: missing columns, wrong nesting or types. No label column
    (`label_column=None`) for data to predict on."""
    problems = []
    names = schema.names

    def missing(column: str, fix: str) -> str:
        return f"{path}: no {column!r} column (columns: {', '.join(names)}); {fix}"

    if features_column not in names:
        problems.append(missing(features_column, "set data.features_column or rewrite the shard"))
    elif not _nested_depth_ok(schema.field(features_column).type)[0]:
        problems.append(f"{path}: column {features_column!r} is {schema.field(features_column).type}, "
                        "expected list<list<float>> (time-major [length, n_features])")
    if label_column is None:
        return problems
    if label_column not in names:
        problems.append(missing(label_column, "set data.label_column or add the regression targets"
                                if regression else "set data.label_column or add integer class labels"))
    elif regression and not _is_number_or_numbers(schema.field(label_column).type):
        problems.append(f"{path}: column {label_column!r} is {schema.field(label_column).type}, "
                        "expected a number or a list of numbers per row for model.task=regression")
    elif not regression and not pa.types.is_integer(schema.field(label_column).type):
        problems.append(f"{path}: column {label_column!r} is {schema.field(label_column).type}, "
                        "expected integer class indices: cast labels to int")
    return problems


def _label_range(pf: pq.ParquetFile, column: str) -> tuple[int | None, int | None, bool]:
    """(min, max, had_nulls) of the label column from row-group statistics, else by reading it."""
    md = pf.metadata
    idx = pf.schema_arrow.get_field_index(column)
    lo = hi = None
    nulls = False
    try:
        leaf = pf.schema.names.index(column)
    except ValueError:
        leaf = None
    stats_ok = leaf is not None and md.num_row_groups > 0
    if stats_ok:
        for rg in range(md.num_row_groups):
            st = md.row_group(rg).column(leaf).statistics
            if st is None or not st.has_min_max or st.null_count is None:
                stats_ok = False
                break
            nulls |= st.null_count > 0
            lo = st.min if lo is None else min(lo, st.min)
            hi = st.max if hi is None else max(hi, st.max)
    if not stats_ok and idx >= 0:
        col = pf.read(columns=[column]).column(0)
        nulls = col.null_count > 0
        mm = pc.min_max(col)
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
    return lo, hi, nulls


def _regression_labels(pf: pq.ParquetFile, column: str) -> tuple[int | None, str | None]:
    """(numbers per label, problem) for a regression label column, read on its own."""
    col = pf.read(columns=[column]).column(0)
    if col.null_count:
        return None, "null labels: every row needs its target value(s)"
    try:
        values = label_matrix(col)
    except (ValueError, pa.ArrowInvalid) as exc:
        return None, f"{exc}"
    if len(values) and not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        return None, f"NaN or inf label in row {row}"
    return (values.shape[1] if len(values) else None), None


def inspect_files(files: list[str], what: str, *, features_column: str,
                  label_column: str | None = None, regression: bool = False,
                  sample_rows: int | None = None) -> DatasetInfo:
    """Check every file's schema and metadata, and the values of its first `sample_rows` rows
    (None: every row). `label_column=None`: unlabelled data (to predict on)."""
    info = DatasetInfo(files=files, rows=0, n_features=None, label_min=None, label_max=None)
    widths: dict[int, str] = {}
    for path in files:
        try:
            pf = open_parquet(path)
        except (pa.ArrowInvalid, OSError) as exc:
            reason = "truncated or corrupt" if "magic" in str(exc).lower() or "size" in str(exc).lower() else str(exc)
            info.problems.append(f"{path}: not a readable Parquet file ({reason}): "
                                 "rewrite it or remove it from the dataset")
            continue
        problems = check_schema(path, pf.schema_arrow, features_column, label_column, regression)
        info.problems += problems
        if problems:
            continue
        info.rows += pf.metadata.num_rows
        if label_column is not None:
            _inspect_labels(info, pf, path, what, label_column, regression)
        # Class counts need every label: only on a full scan.
        counted = label_column if sample_rows is None and not regression else None
        _inspect_values(info, pf, path, features_column, counted, sample_rows, widths)
    if len(widths) > 1:
        (w1, f1), (w2, f2) = list(widths.items())[:2]
        info.problems.append(f"{what}: inconsistent n_features across files: {f1} has {w1}, "
                             f"{f2} has {w2}: all shards need the same number of features")
    elif widths:
        info.n_features = next(iter(widths))
    if not info.problems and info.rows == 0:
        info.problems.append(f"{what}: the files hold no rows: write sequences into them first")
    return info


def _inspect_labels(info: DatasetInfo, pf: pq.ParquetFile, path: str, what: str,
                    label_column: str, regression: bool) -> None:
    """The label range (classes) or the targets per row (regression) of one file."""
    if regression:
        width, problem = _regression_labels(pf, label_column)
        if problem:
            info.problems.append(f"{path}: {problem}: fix or drop those rows")
        elif width is not None and info.num_outputs not in (None, width):
            info.problems.append(f"{what}: {path} has {width} target values per row, other "
                                 f"files {info.num_outputs}: use one forecast horizon")
        elif width is not None:
            info.num_outputs = width
        return
    lo, hi, nulls = _label_range(pf, label_column)
    if nulls:
        info.problems.append(f"{path}: null labels: every row needs a class index")
    if lo is not None:
        info.label_min = lo if info.label_min is None else min(info.label_min, lo)
        info.label_max = hi if info.label_max is None else max(info.label_max, hi)
        if lo < 0:
            info.problems.append(f"{path}: negative label {lo}: labels are class indices "
                                 "in [0, num_classes)")


def _inspect_values(info: DatasetInfo, pf: pq.ParquetFile, path: str, features_column: str,
                    counted_label: str | None, budget: int | None, widths: dict[int, str]) -> None:
    """Sequence values (lengths, widths, finite numbers) of the first `budget` rows of one file
    (every row for None), and the class counts of `counted_label`."""
    columns = [features_column] + ([counted_label] if counted_label else [])
    row0 = 0
    try:
        for batch in pf.iter_batches(batch_size=min(budget or 8192, 8192), columns=columns):
            try:
                _, lengths, width = pad_arrow(batch.column(0))
            except ValueError as exc:
                info.problems.append(f"{path}: {_shift_row(str(exc), row0)}: fix or drop those rows")
                return
            if batch.num_rows:
                widths.setdefault(width, path)
            _add_counts(info.length_counts, lengths)
            if counted_label:
                labels = batch.column(1).drop_null().to_numpy()
                _add_counts(info.class_counts, labels[labels >= 0])
            row0 += batch.num_rows
            if budget is not None and row0 >= budget:
                return
    except (pa.ArrowInvalid, OSError) as exc:
        info.problems.append(f"{path}: cannot be read ({exc}): the file is truncated or corrupt; "
                             "rewrite it")


def _shift_row(message: str, row0: int) -> str:
    """Rewrite 'row N of the batch' to the row number within the file."""
    return re.sub(r"row (\d+)( of the batch)?", lambda m: f"row {int(m.group(1)) + row0}", message)


@dataclass
class TrainData:
    """Validated training inputs, ready for Ray Data."""

    train_files: list[str]
    val_files: list[str] | None
    n_features: int
    num_classes: int
    train_rows: int
    val_rows: int | None
    num_outputs: int | None = None
    """Regression: outputs of the model (numbers per label); None for classification."""


def validate_train_data(cfg: DataConfig, regression: bool = False) -> TrainData:
    """All up-front data checks for training; raises DataError listing every problem."""
    train_files = list_shards(cfg.train_path, "data.train_path")
    val_files = list_shards(cfg.val_path, "data.val_path") if cfg.val_path is not None else None
    columns = dict(features_column=cfg.features_column, label_column=cfg.label_column,
                   regression=regression, sample_rows=cfg.sample_rows)
    train = inspect_files(train_files, "data.train_path", **columns)
    problems = list(train.problems)
    val = None
    if val_files is not None:
        val = inspect_files(val_files, "data.val_path", **columns)
        problems += val.problems
        if not val.problems and not train.problems and val.n_features != train.n_features:
            problems.append(f"validation shards have {val.n_features} features per step, training "
                            f"shards {train.n_features}: use the same features in both")
    if regression:
        if val is not None and not problems and val.num_outputs != train.num_outputs:
            problems.append(f"validation labels have {val.num_outputs} target values per row, "
                            f"training labels {train.num_outputs}: use one forecast horizon")
        collect(problems, DataError, "the data")
        return TrainData(train_files=train_files, val_files=val_files,
                         n_features=int(train.n_features), num_classes=0,
                         train_rows=train.rows, val_rows=val.rows if val else None,
                         num_outputs=int(train.num_outputs or 1))
    num_classes = cfg.num_classes
    if num_classes is None and train.label_max is not None:
        num_classes = max(int(train.label_max) + 1, 2)
    for info, what in ((train, "data.train_path"), (val, "data.val_path")):
        if info is not None and info.label_max is not None and num_classes is not None \
                and info.label_max >= num_classes:
            problems.append(f"{what}: label {info.label_max} is out of range for {num_classes} classes "
                            "(data.num_classes): labels are class indices in [0, num_classes)")
    collect(problems, DataError, "the data")
    return TrainData(
        train_files=train_files,
        val_files=val_files,
        n_features=int(train.n_features),
        num_classes=int(num_classes),
        train_rows=train.rows,
        val_rows=val.rows if val else None,
    )


def check_shards(paths: list[str], *, features_column: str = "features",
                 label_column: str | None = "label", regression: bool = False,
                 num_classes: int | None = None, sample_rows: int | None = None) -> list[str]:
    """`data check`: every row checked (or the first `sample_rows` of each file); the summary
    lines (files, rows, features, lengths, classes or targets), or DataError with every problem."""
    files = list_shards(list(paths), "data")
    info = inspect_files(files, "data", features_column=features_column, label_column=label_column,
                         regression=regression, sample_rows=sample_rows)
    problems = list(info.problems)
    if num_classes is not None and info.label_max is not None and info.label_max >= num_classes:
        problems.append(f"label {info.label_max} is out of range for {num_classes} classes")
    collect(problems, DataError, "the data")
    pct = info.length_percentiles()
    lines = [f"files:       {len(files)}", f"rows:        {info.rows}",
             f"n_features:  {info.n_features}",
             "lengths:     " + "  ".join(f"p{q}={v}" if q < 100 else f"max={v}" for q, v in pct.items())
             + ("" if sample_rows is None else f"  (first {sample_rows} rows per file)")]
    if info.class_counts:
        lines.append("classes:     " + "  ".join(f"{k}:{v}" for k, v in sorted(info.class_counts.items())))
    elif label_column is not None and regression:
        lines.append(f"targets:     {info.num_outputs} per row")
    elif label_column is not None:
        lines.append(f"labels:      {info.label_min}..{info.label_max}")
    return lines + ["ok"]
