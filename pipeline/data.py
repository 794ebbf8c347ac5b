"""Reading shards with Ray Data and turning Arrow batches into padded tensors.

    train_ds, val_ds = make_datasets(data, cfg.data)      # lazy Ray Datasets, bounded blocks
    collate = SequenceCollate("features", "label", task)  # Arrow batch -> x, lengths, label

Finding and checking the shard files is pipeline/shards.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from ray.data.collate_fn import ArrowBatchCollateFn

from pipeline.config import DataConfig
from pipeline.errors import DataError
from pipeline.model import pad_arrow
from pipeline.shards import CHECK_HINT, TrainData

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
    """Arrow batch -> {"x": [B, T, F] float32 zero-padded, "lengths": [B], "label": [B] or
    [B, outputs]}; the task (pipeline/task.py) checks and converts the labels.

    An Arrow collate (not NumpyBatchCollateFn) because list<list<float>> columns become object
    arrays of arrays in NumPy format, which costs a Python loop per row; from Arrow the values are
    flattened once and scattered into the padded tensor (see `pad_arrow`).
    """

    def __init__(self, features_column: str, label_column: str | None, task, n_features: int):
        super().__init__()
        self.features_column = features_column
        self.label_column = label_column
        self.task = task
        self.n_features = n_features

    def __call__(self, batch: pa.Table) -> dict:
        import torch

        try:
            x, lengths, width = pad_arrow(batch.column(self.features_column))
        except ValueError as exc:
            raise DataError(f"bad training data: {exc}: {CHECK_HINT}") from None
        if len(lengths) and width != self.n_features:
            raise DataError(f"bad training data: a batch has {width} features per step, "
                            f"expected {self.n_features}: {CHECK_HINT}")
        out = {"x": torch.from_numpy(x), "lengths": torch.from_numpy(lengths)}
        if self.label_column is not None:
            try:
                out["label"] = torch.from_numpy(self.task.labels(batch.column(self.label_column)))
            except ValueError as exc:
                raise DataError(f"bad training data: {exc}: {CHECK_HINT}") from None
        return out
