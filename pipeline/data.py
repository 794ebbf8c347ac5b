"""Parquet sequence shards: find, validate, read with Ray Data, collate into padded batches.

Shard format (one row per sequence):
    features  list<list<float32>>  time-major, [length, n_features] (fixed_size_list also accepted)
    label     integer              class index in [0, num_classes)
              (model.task=regression: float, or list<float> of the same length in every row)
    id        any scalar, optional carried to predictions

Validation happens on the driver before any cluster work and never reads a dataset whole: every
file's schema and metadata are checked, plus the values of a bounded sample of rows per file. The
rest of the values are checked as the workers collate each batch (same rules, same wording).
`lstm-pipeline data check PATH` scans every row, one record batch at a time.
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
from ray.data.collate_fn import ArrowBatchCollateFn

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


def check_schema(path: str, schema: pa.Schema, cfg: DataConfig, need_label: bool = True,
                 regression: bool = False) -> list[str]:
    """Problems with one file's schema: missing columns, wrong nesting or types."""
    problems = []
    names = schema.names
    if cfg.features_column not in names:
        problems.append(f"{path}: no {cfg.features_column!r} column (columns: {', '.join(names)}); "
                        "set data.features_column or rewrite the shard")
    else:
        ok, _ = _nested_depth_ok(schema.field(cfg.features_column).type)
        if not ok:
            problems.append(
                f"{path}: column {cfg.features_column!r} is {schema.field(cfg.features_column).type}, "
                "expected list<list<float>> (time-major [length, n_features])"
            )
    if need_label and regression:
        if cfg.label_column not in names:
            problems.append(f"{path}: no {cfg.label_column!r} column (columns: {', '.join(names)}); "
                            "set data.label_column or add the regression targets")
        elif not _is_number_or_numbers(schema.field(cfg.label_column).type):
            problems.append(
                f"{path}: column {cfg.label_column!r} is {schema.field(cfg.label_column).type}, "
                "expected a number or a list of numbers per row for model.task=regression"
            )
    elif need_label:
        if cfg.label_column not in names:
            problems.append(f"{path}: no {cfg.label_column!r} column (columns: {', '.join(names)}); "
                            "set data.label_column or add integer class labels")
        elif not pa.types.is_integer(schema.field(cfg.label_column).type):
            problems.append(
                f"{path}: column {cfg.label_column!r} is {schema.field(cfg.label_column).type}, "
                "expected integer class indices: cast labels to int"
            )
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
    from pipeline.normalize import label_matrix

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


def inspect_files(files: list[str], cfg: DataConfig, what: str, need_label: bool = True,
                  full_scan: bool = False, regression: bool = False) -> DatasetInfo:
    """Check every file's schema and metadata and a bounded sample of values (or all values)."""
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
        schema = pf.schema_arrow
        problems = check_schema(path, schema, cfg, need_label, regression)
        info.problems += problems
        if problems:
            continue
        info.rows += pf.metadata.num_rows
        if need_label and regression:
            width, problem = _regression_labels(pf, cfg.label_column)
            if problem:
                info.problems.append(f"{path}: {problem}: fix or drop those rows")
            elif width is not None and info.num_outputs not in (None, width):
                info.problems.append(f"{what}: {path} has {width} target values per row, other "
                                     f"files {info.num_outputs}: use one forecast horizon")
            elif width is not None:
                info.num_outputs = width
        elif need_label:
            lo, hi, nulls = _label_range(pf, cfg.label_column)
            if nulls:
                info.problems.append(f"{path}: null labels: every row needs a class index")
            if lo is not None:
                info.label_min = lo if info.label_min is None else min(info.label_min, lo)
                info.label_max = hi if info.label_max is None else max(info.label_max, hi)
                if lo < 0:
                    info.problems.append(f"{path}: negative label {lo}: labels are class indices "
                                         "in [0, num_classes)")
        # Values: the first `sample_rows` rows, or every row for a full scan.
        budget = None if full_scan else cfg.sample_rows
        columns = [cfg.features_column] + ([cfg.label_column] if need_label and full_scan
                                           and not regression else [])
        row0 = 0
        try:
            for batch in pf.iter_batches(batch_size=min(budget or 8192, 8192), columns=columns):
                try:
                    _, lengths, width = pad_arrow(batch.column(0))
                except ValueError as exc:
                    info.problems.append(f"{path}: {_shift_row(str(exc), row0)}: "
                                         "fix or drop those rows")
                    break
                if batch.num_rows:
                    widths.setdefault(width, path)
                _add_counts(info.length_counts, lengths)
                if len(columns) > 1:
                    labels = batch.column(1).drop_null().to_numpy()
                    _add_counts(info.class_counts, labels[labels >= 0])
                row0 += batch.num_rows
                if budget is not None and row0 >= budget:
                    break
        except (pa.ArrowInvalid, OSError) as exc:
            info.problems.append(f"{path}: cannot be read ({exc}): the file is truncated or corrupt; "
                                 "rewrite it")
    if len(widths) > 1:
        (w1, f1), (w2, f2) = list(widths.items())[:2]
        info.problems.append(f"{what}: inconsistent n_features across files: {f1} has {w1}, "
                             f"{f2} has {w2}: all shards need the same number of features")
    elif widths:
        info.n_features = next(iter(widths))
    if not info.problems and info.rows == 0:
        info.problems.append(f"{what}: the files hold no rows: write sequences into them first")
    return info


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
    train = inspect_files(train_files, cfg, "data.train_path", regression=regression)
    problems = list(train.problems)
    val = None
    if val_files is not None:
        val = inspect_files(val_files, cfg, "data.val_path", regression=regression)
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


# --------------------------------------------------------------------------- Ray Data


BLOCK_BYTES = 8 * 2**20
"""Our datasets' blocks are cut to at most this many bytes (Ray's default is 128 MiB). A block
is the unit a worker holds, prefetches and maps from the object store, so bounded blocks keep
what a worker holds at a time from growing with the files (the object-store pages it has read
still count in its RSS; see benchmarks/README.md), and small blocks let reading, the model and
writing overlap instead of running one after the other."""


def read_parquet_columns(files: list[str], columns: list[str], reader: str = "v1",
                         row_hash: bool = False):
    """Lazily read `columns` of Parquet files with Ray Data: one read task per file, blocks of at
    most BLOCK_BYTES. `reader` picks Ray Data's Parquet datasource (DataConfig.parquet_reader)."""
    import ray.data
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = reader == "v2"  # read when the dataset is created, not later
    try:
        ds = ray.data.read_parquet(files, file_extensions=None, include_row_hash=row_hash,
                                   override_num_blocks=None if reader == "v2" else len(files))
    finally:
        ctx.use_datasource_v2 = before
    # Ray Data pushes the projection down into the Parquet read.
    ds = ds.select_columns(columns + (["row_hash"] if row_hash else []))
    ds.context.target_max_block_size = BLOCK_BYTES
    # A DataError raised in a map function (a bad row found while predicting) reaches the driver
    # as itself, inside Ray's task error, instead of as a UserCodeException carrying only text.
    ds.context.raise_original_map_exception = True
    return ds


def read_shards(files: list[str], cfg: DataConfig, with_label: bool = True, row_hash: bool = False):
    """Lazily read shards with Ray Data, keeping only the columns training needs."""
    columns = [cfg.features_column] + ([cfg.label_column] if with_label else [])
    return read_parquet_columns(files, columns, cfg.parquet_reader, row_hash)


def _split_by_hash(batch: pa.Table, fraction: float, seed: int, keep_val: bool) -> pa.Table:
    """Deterministic per-row split from Ray Data's row hash (file path + row position) and a seed."""
    h = batch.column("row_hash").to_numpy(zero_copy_only=False).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = h ^ np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    is_val = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction
    return batch.filter(pa.array(is_val if keep_val else ~is_val)).drop_columns(["row_hash"])


def make_datasets(data: TrainData, cfg: DataConfig):
    """(train, validation) Ray Datasets: a separate validation set or a seeded row split."""
    if data.val_files is not None:
        return read_shards(data.train_files, cfg), read_shards(data.val_files, cfg)
    base = read_shards(data.train_files, cfg, row_hash=True)
    args = dict(fraction=cfg.val_fraction, seed=cfg.seed)
    train = base.map_batches(_split_by_hash, batch_format="pyarrow", zero_copy_batch=True,
                             fn_kwargs=dict(args, keep_val=False))
    val = base.map_batches(_split_by_hash, batch_format="pyarrow", zero_copy_batch=True,
                           fn_kwargs=dict(args, keep_val=True))
    return train, val


class SequenceCollate(ArrowBatchCollateFn):
    """Arrow batch -> {"x": [B, T, F] float32 zero-padded, "lengths": [B], "label": [B]}.

    An Arrow collate (not NumpyBatchCollateFn) because list<list<float>> columns become object
    arrays of arrays in NumPy format, which costs a Python loop per row; from Arrow the values are
    flattened once and scattered into the padded tensor (see `pad_arrow`).
    """

    def __init__(self, features_column: str, label_column: str | None, num_classes: int | None,
                 n_features: int | None = None, regression: bool = False):
        """`regression`: labels are numbers (or lists of numbers) -> float32 [B, outputs]."""
        super().__init__()
        self.regression = regression
        self.features_column = features_column
        self.label_column = label_column
        self.num_classes = num_classes
        self.n_features = n_features

    def __call__(self, batch: pa.Table) -> dict:
        import torch

        try:
            x, lengths, width = pad_arrow(batch.column(self.features_column))
        except ValueError as exc:
            raise DataError(f"bad training data: {exc}: {CHECK_HINT}") from None
        if self.n_features is not None and len(lengths) and width != self.n_features:
            raise DataError(f"bad training data: a batch has {width} features per step, "
                            f"expected {self.n_features}: {CHECK_HINT}")
        out = {"x": torch.from_numpy(x), "lengths": torch.from_numpy(lengths)}
        if self.label_column is not None and self.regression:
            from pipeline.normalize import label_matrix

            try:
                labels = label_matrix(batch.column(self.label_column)).astype(np.float32)
            except (ValueError, pa.ArrowInvalid) as exc:
                raise DataError(f"bad training data: {exc}: {CHECK_HINT}") from None
            if not np.isfinite(labels).all():
                raise DataError(f"bad training data: null, NaN or inf labels: {CHECK_HINT}")
            out["label"] = torch.from_numpy(labels)
        elif self.label_column is not None:
            labels = batch.column(self.label_column).to_numpy(zero_copy_only=False)
            if labels.dtype.kind not in "iu" or (self.num_classes is not None and len(labels) and
                                                 (labels.min() < 0 or labels.max() >= self.num_classes)):
                raise DataError(f"bad training data: labels outside [0, {self.num_classes}) or not "
                                f"integers: {CHECK_HINT}")
            out["label"] = torch.from_numpy(labels.astype(np.int64))
        return out
