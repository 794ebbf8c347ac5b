"""Long-format tables of readings (one row per sequence id and time step) -> sequence shards.

    lstm-pipeline data prepare --input readings.csv --out data/readings --id-col machine \
        --time-col ts --feature-cols temp,vibration --label-col state
    lstm-pipeline data prepare --input series.parquet --out data/forecast --id-col series \
        --time-col t --feature-cols value --window 48 --horizon 6

Out of memory by construction, with pyarrow's dataset and compute APIs only (no Python loop over
rows or sequences):

1. a streaming pass over the id (and label) columns collects the distinct sequence ids (and
   class names); the ids are split into train/validation with a seeded permutation and dealt to
   `shards` parts per split;
2. a streaming pass over the needed columns tags each row with its part (`index_in` on the
   sorted ids) and writes the rows partitioned by part (`pyarrow.dataset.write_dataset`);
3. each part is read alone, sorted by (id, time), checked (duplicate pairs, a label that
   varies, missing values) and turned into `list<list<float32>>` sequences from the run
   boundaries of the sorted ids (pipeline/sequences.py). Memory is about one part: raise
   --shards for bigger inputs.

Everything goes into a staging directory beside OUT that is renamed into place at the end
(`pipeline.storage.Output`): OUT appears whole (train/, val/, dataset.json) or not at all. The dataset facts (task, class
names, feature names, window/horizon) are in OUT/dataset.json and in every shard's Parquet
schema metadata (key `lstm_pipeline.dataset`), where training picks the class names up.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.sequences import build_part
from pipeline.shards import open_parquet
from pipeline.storage import Output

META_KEY = b"lstm_pipeline.dataset"
DATASET_FILE = "dataset.json"
MISSING = ("error", "ffill", "drop")
CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


@dataclass
class PrepareSpec:
    input: list[str]
    """CSV or Parquet files or directories of them (a long-format table)."""
    out: str
    """Directory to create: OUT/train, OUT/val, OUT/dataset.json."""
    id_col: str
    time_col: str
    feature_cols: list[str] | None = None
    """Numeric columns that make each step's features; None = every numeric column except the
    id, time and label columns."""
    label_col: str | None = None
    """Per-sequence label: strings become class indices (names kept), integers are class indices,
    floats are regression targets. Must be constant within a sequence."""
    val_fraction: float = 0.2
    shards: int = 4
    seed: int = 0
    missing: str = "error"
    """Missing feature values (null or NaN): error, ffill (last reading of the same sequence;
    rows before a sequence's first reading are dropped) or drop (the rows)."""
    window: int | None = None
    """Forecasting: past steps per example."""
    horizon: int = 1
    """Forecasting: the label is the next `horizon` values of the target column."""
    target_col: str | None = None
    """Forecasting: the column to forecast; default the only feature column."""
    stride: int = 1
    """Forecasting: steps between the starts of consecutive windows of a series."""
    overwrite: bool = False

    def check(self) -> None:
        problems = []
        if not 0.0 < self.val_fraction < 1.0:
            problems.append("--val-fraction must be between 0 and 1 (exclusive)")
        if self.shards < 1:
            problems.append("--shards must be >= 1")
        if self.missing not in MISSING:
            problems.append(f"--missing must be one of {', '.join(MISSING)}")
        if self.window is not None:
            if self.window < 1 or self.horizon < 1 or self.stride < 1:
                problems.append("--window, --horizon and --stride must be >= 1")
            if self.label_col is not None:
                problems.append("--label-col with --window: a forecasting example's label is the "
                                "future of --target-col; drop --label-col")
        elif self.target_col is not None:
            problems.append("--target-col needs --window (forecasting mode)")
        if problems:
            raise DataError("; ".join(problems))


@dataclass
class PrepareResult:
    out: str
    facts: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        """What `data prepare` prints."""
        f = self.facts
        what = "forecasting windows" if f["window"] else "sequences"
        lines = [f"read {f['input_rows']} rows of {f['sequences']} sequences; wrote "
                 f"{self.counts['train']} training and {self.counts['val']} validation {what} "
                 f"to {self.out}",
                 f"features:    {', '.join(f['features'])}"]
        if f["class_names"]:
            lines.append(f"classes:     {', '.join(f'{i}={n}' for i, n in enumerate(f['class_names']))}")
        if f["window"]:
            lines.append(f"forecast:    {f['window']} steps of {', '.join(f['features'])} -> next "
                         f"{f['horizon']} value(s) of {f['target_column']}")
        if f["task"] == "regression":
            lines.append("train with:  model.task=regression")
        return lines


# --------------------------------------------------------------------------- reading


def _format_of(path: str) -> str | None:
    name = path.lower()
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def open_table(paths: list[str]) -> tuple[pads.Dataset, str]:
    """A pyarrow dataset over the input files (CSV or Parquet, not mixed); the format."""
    files: list[str] = []
    for item in paths:
        item = os.path.abspath(os.path.expanduser(item))
        if os.path.isdir(item):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(item) for f in names
                           if _format_of(f) and not f.startswith((".", "_")))
            if not found:
                raise DataError(f"--input: directory {item} holds no .csv or .parquet files: "
                                "point --input at the table of readings")
            files += found
        elif os.path.isfile(item):
            if _format_of(item) is None:
                raise DataError(f"--input: {item} is neither .csv nor .parquet: convert it or "
                                "rename it with the right suffix")
            files.append(item)
        else:
            raise DataError(f"--input: {item} does not exist: check the path")
    formats = {_format_of(f) for f in files}
    if len(formats) > 1:
        raise DataError("--input mixes CSV and Parquet files: convert them to one format")
    fmt = formats.pop()
    if fmt == "csv":
        import pyarrow.csv as pacsv

        delimiter = "\t" if files[0].lower().endswith(".tsv") else ","
        fmt_obj = pads.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter=delimiter))
    else:
        fmt_obj = pads.ParquetFileFormat()
    try:
        return pads.dataset(files, format=fmt_obj), fmt
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"--input: cannot read {files[0]} as {fmt} ({str(exc).splitlines()[0]}): "
                        "fix the file") from None


def _numeric(tp: pa.DataType) -> bool:
    return pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_decimal(tp)


def _resolve_columns(spec: PrepareSpec, schema: pa.Schema, where: str) -> tuple[list[str], str | None]:
    """(feature columns, label kind: 'names' | 'index' | 'regression' | None); errors name columns."""
    names = schema.names
    problems = []
    wanted = [("--id-col", spec.id_col), ("--time-col", spec.time_col)]
    wanted += [("--label-col", spec.label_col)] if spec.label_col else []
    wanted += [("--target-col", spec.target_col)] if spec.target_col else []
    wanted += [("--feature-cols", c) for c in spec.feature_cols or []]
    for flag, col in wanted:
        if col not in names:
            problems.append(f"{flag}: no column {col!r} in {where} (columns: {', '.join(names)}): "
                            "check the spelling")
    if problems:
        raise DataError(problems[0] if len(problems) == 1 else "; ".join(problems))
    special = {spec.id_col, spec.time_col, spec.label_col}
    if spec.feature_cols:
        features = list(spec.feature_cols)
        for col in features:
            tp = schema.field(col).type
            if not _numeric(tp):
                raise DataError(f"--feature-cols: column {col!r} in {where} is {tp}, not numeric: "
                                "convert it to numbers or leave it out of --feature-cols")
            if col in special:
                raise DataError(f"--feature-cols: {col!r} is also the id, time or label column: "
                                "leave it out of --feature-cols")
    else:
        features = [n for n in names if n not in special and _numeric(schema.field(n).type)]
        if not features:
            raise DataError(f"{where} has no numeric columns besides the id, time and label: "
                            "pass --feature-cols")
    if spec.window is not None:
        target = spec.target_col
        if target is None and len(features) != 1:
            raise DataError(f"--target-col is required with --window when there are several "
                            f"feature columns ({', '.join(features)}): name the column to forecast")
        target = target or features[0]
        if not _numeric(schema.field(target).type):
            raise DataError(f"--target-col: column {target!r} in {where} is "
                            f"{schema.field(target).type}, not numeric")
        spec.target_col = target
    label_kind = None
    if spec.label_col:
        tp = schema.field(spec.label_col).type
        if pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_dictionary(tp) \
                or pa.types.is_boolean(tp):
            label_kind = "names"
        elif pa.types.is_integer(tp):
            label_kind = "index"
        elif pa.types.is_floating(tp) or pa.types.is_decimal(tp):
            label_kind = "regression"
        else:
            raise DataError(f"--label-col: column {spec.label_col!r} in {where} is {tp}: use class "
                            "names (strings), class indices (integers) or numbers to regress")
    return features, label_kind


# --------------------------------------------------------------------------- the passes


def _distinct(dataset: pads.Dataset, spec: PrepareSpec, label_kind: str | None, where: str):
    """Streaming pass 1: sorted distinct ids, sorted distinct label names, row count."""
    columns = [spec.id_col] + ([spec.label_col] if label_kind == "names" else [])
    ids = labels = None
    rows = 0
    for batch in dataset.to_batches(columns=columns):
        rows += batch.num_rows
        col = batch.column(0)
        if col.null_count:
            raise DataError(f"--id-col: column {spec.id_col!r} in {where} has missing ids: every "
                            "reading needs its sequence id; fill or drop those rows")
        u = pc.unique(col)
        ids = u if ids is None else pc.unique(pa.concat_arrays([ids, u.cast(ids.type)]))
        if label_kind == "names":
            lab = batch.column(1)
            if pa.types.is_dictionary(lab.type):
                lab = lab.cast(lab.type.value_type)
            lab = lab.cast(pa.string())
            u = pc.unique(lab)
            labels = u if labels is None else pc.unique(pa.concat_arrays([labels, u]))
    if not rows:
        raise DataError(f"--input: {where} has no rows")
    ids = ids.take(pc.sort_indices(ids))
    names = None
    if labels is not None:
        if labels.null_count:
            raise DataError(f"--label-col: column {spec.label_col!r} in {where} has missing labels: "
                            "every reading needs its sequence's label; fill or drop those rows")
        names = labels.take(pc.sort_indices(labels)).to_pylist()
    return ids, names, rows


def _assign_parts(ids: pa.Array, spec: PrepareSpec) -> tuple[np.ndarray, int, int]:
    """Part of each id (index-aligned with the sorted ids): train parts first, then val parts."""
    n = len(ids)
    if n < 2:
        raise DataError(f"--id-col: the table holds {n} sequence: a train/validation split needs "
                        "at least 2 ids")
    order = np.random.default_rng(spec.seed).permutation(n)
    n_val = min(max(1, int(round(n * spec.val_fraction))), n - 1)
    is_val = np.zeros(n, dtype=bool)
    is_val[order[:n_val]] = True
    train_parts = min(spec.shards, n - n_val)
    val_parts = min(spec.shards, n_val)
    part = np.empty(n, dtype=np.int32)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)  # deal ids to parts in permutation order: balanced and seeded
    part[~is_val] = np.argsort(np.argsort(rank[~is_val])) % train_parts
    part[is_val] = train_parts + np.argsort(np.argsort(rank[is_val])) % val_parts
    return part, train_parts, val_parts


def _partition(dataset: pads.Dataset, columns: list[str], spec: PrepareSpec, ids: pa.Array,
               part_of_id: np.ndarray, scratch: str) -> None:
    """Streaming pass 2: every row tagged with its part and written partitioned by it."""
    part_arr = pa.array(part_of_id)
    schema = dataset.schema
    out_schema = pa.schema([schema.field(c) for c in columns] + [pa.field("part", pa.int32())])

    def tagged():
        for batch in dataset.to_batches(columns=columns):
            idx = pc.index_in(batch.column(spec.id_col).cast(ids.type), value_set=ids)
            yield pa.RecordBatch.from_arrays(list(batch.columns) + [part_arr.take(idx)],
                                             schema=out_schema)

    pads.write_dataset(
        pa.RecordBatchReader.from_batches(out_schema, tagged()), scratch, format="parquet",
        partitioning=pads.partitioning(pa.schema([("part", pa.int32())]), flavor="hive"),
        existing_data_behavior="overwrite_or_ignore", max_partitions=max(2 * spec.shards, 1024),
    )


# --------------------------------------------------------------------------- the job


def prepare(spec: PrepareSpec) -> PrepareResult:
    """Convert the long-format table into OUT/train, OUT/val shards and OUT/dataset.json."""
    spec.check()
    dataset, fmt = open_table(spec.input)
    where = ", ".join(spec.input) if len(spec.input) <= 3 else f"{spec.input[0]} (+{len(spec.input) - 1})"
    features, label_kind = _resolve_columns(spec, dataset.schema, where)
    output = Output(spec.out, "prepare", overwrite=spec.overwrite, inputs={"--input": spec.input})
    ids, names, rows = _distinct(dataset, spec, label_kind, where)
    part_of_id, train_parts, val_parts = _assign_parts(ids, spec)
    columns = list(dict.fromkeys([spec.id_col, spec.time_col, *features]
                                 + ([spec.label_col] if spec.label_col else [])
                                 + ([spec.target_col] if spec.target_col else [])))
    with output.staged() as staging:
        scratch = os.path.join(staging, ".scratch")
        _partition(dataset, columns, spec, ids, part_of_id, scratch)
        task = "regression" if spec.window is not None or label_kind == "regression" else (
            "classification" if label_kind else None)
        facts = {
            "source": [os.path.abspath(p) for p in spec.input],
            "format": fmt,
            "task": task,
            "class_names": names,
            "features": features,
            "id_column": spec.id_col,
            "time_column": spec.time_col,
            "label_column": spec.label_col,
            "window": spec.window,
            "horizon": spec.horizon if spec.window else None,
            "target_column": spec.target_col,
            "stride": spec.stride if spec.window else None,
            "missing": spec.missing,
            "val_fraction": spec.val_fraction,
            "seed": spec.seed,
            "input_rows": rows,
            "sequences": len(ids),
        }
        meta = {META_KEY: json.dumps(facts).encode()}
        counts = {"train": 0, "val": 0}
        for k in range(train_parts + val_parts):
            split = "train" if k < train_parts else "val"
            index = k if k < train_parts else k - train_parts
            part_dir = os.path.join(scratch, f"part={k}")
            table = pads.dataset(part_dir, format="parquet").to_table() if os.path.isdir(part_dir) \
                else None
            if table is None:
                continue
            built = build_part(table, spec, features, label_kind, names, where)
            os.makedirs(os.path.join(staging, split), exist_ok=True)
            pq.write_table(built.replace_schema_metadata(meta),
                           os.path.join(staging, split, f"part-{index:05d}.parquet"))
            counts[split] += built.num_rows
        shutil.rmtree(scratch)
        for split in ("train", "val"):
            if counts[split] == 0:
                raise DataError(
                    f"no {split} {'examples' if spec.window else 'sequences'} left"
                    + (f": every series is shorter than --window + --horizon = "
                       f"{spec.window + spec.horizon} steps; lower them" if spec.window else
                       ": check --missing and --val-fraction"))
        facts["examples"] = counts
        with open(os.path.join(staging, DATASET_FILE), "w") as fh:
            json.dump(facts, fh, indent=2)
    return PrepareResult(out=output.target, facts=facts, counts=counts)


def dataset_facts(files: list[str]) -> dict[str, Any] | None:
    """What `data prepare` recorded in the shards' schema metadata (None for other shards)."""
    if not files:
        return None
    try:
        metadata = open_parquet(files[0]).schema_arrow.metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    raw = metadata.get(META_KEY)
    return json.loads(raw) if raw else None

