"""Length bucketing: batches of similar-length sequences, so a batch pads to less.

With skewed lengths (most short, a few long), a plain batch of 256 rows almost always holds one
long sequence and is padded to it; the LSTM then runs that many time steps for the whole batch
(packing skips the padded rows' work, not the per-step cost). Bucketing takes a *window* of
`window x batch_size` consecutive rows from a worker's stream, orders them by length (ties in a
seeded random order), cuts the window into batches of `batch_size`, and yields those batches in a
seeded random order. Every row still appears exactly once per epoch, the number of batches is the
same as without bucketing, and a window whose rows all have the same length passes through
untouched (fixed-length data keeps its order).

What changes is the data order: a batch holds rows of similar length from one window (rows never
move between windows), and the batch order within a window is shuffled per epoch. The random
choices depend only on (seed, epoch, window number) for the batch order, which is the same on
every rank, and on the rank too for ties among equal lengths; so a run and its restart from a
checkpoint see the same batches.

    for table in bucketed_batches(shard.iter_batches(batch_size=8 * 256, batch_format="pyarrow"),
                                  batch_size=256, column="features", seed=0, epoch=3):
        batch = collate(table)
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def sequence_lengths(table: pa.Table, column: str) -> np.ndarray:
    """Steps per row of a list column (nulls count as 0; collate reports them)."""
    col = table.column(column)
    return pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)


def bucket_window(table: pa.Table, batch_size: int, column: str, rng: np.random.Generator,
                  order_rng: np.random.Generator | None = None) -> list[pa.Table]:
    """One window -> its batches: rows ordered by length (random among equal lengths, `rng`),
    cut into `batch_size` slices, the slices in random order (`order_rng`, default `rng`).
    Equal lengths everywhere: plain slices."""
    n = table.num_rows
    if n == 0:
        return []
    lengths = sequence_lengths(table, column)
    starts = list(range(0, n, batch_size))
    if lengths.min() == lengths.max():
        return [table.slice(s, batch_size) for s in starts]
    tie_break = rng.permutation(n)
    order = tie_break[np.argsort(lengths[tie_break], kind="stable")]
    ordered = table.take(pa.array(order))
    (order_rng or rng).shuffle(starts)
    return [ordered.slice(s, batch_size) for s in starts]


def bucketed_batches(windows: Iterable[pa.Table], batch_size: int, column: str, seed: int,
                     epoch: int, rank: int = 0) -> Iterator[pa.Table]:
    """Batches of `batch_size` rows (the last of the last window may be smaller) from windows of
    rows, e.g. `iter_batches(batch_size=window * batch_size, batch_format="pyarrow")`."""
    for i, table in enumerate(windows):
        if not isinstance(table, pa.Table):
            table = pa.table(table)
        rng = np.random.default_rng([seed, epoch, rank, i])
        # The batch order is the same on every rank: DDP waits at each step for the slowest
        # worker, so all ranks take their k-th shortest batch of a window at the same step.
        # (Independent orders made a step as slow as the longest batch on any rank: measured
        # slower than no bucketing at all on skewed lengths.)
        order_rng = np.random.default_rng([seed, epoch, i])
        yield from bucket_window(table, batch_size, column, rng, order_rng)


def padding_fraction(lengths: Iterable[np.ndarray]) -> float:
    """Padded (wasted) steps / all steps over batches given by their per-row lengths."""
    padded = valid = 0
    for lens in lengths:
        lens = np.asarray(lens)
        if len(lens):
            padded += int(lens.max()) * len(lens)
            valid += int(lens.sum())
    return 1.0 - valid / padded if padded else 0.0


class ShardCache:
    """A worker's Ray Data shard, kept in memory after one full pass when it fits `max_bytes`.

    Ray Data starts a new streaming execution for every pass over a shard: read tasks, the split
    coordinator, the first blocks in flight. Measured on 10k sequences of 100 x 16 with 2 workers
    (benchmarks/data_path.py), that start-up and the streaming kept rank 0 waiting for data 45% of
    its training pass. A small shard is therefore recorded as Arrow windows during its first pass and
    replayed from memory afterwards: the same rows in the same windows, bucketed again with each
    epoch's seed, so the batches are exactly those a streamed epoch would give. A shard larger
    than `max_bytes` (Arrow bytes) streams every epoch and the worker's memory stays flat.
    """

    def __init__(self, shard, max_bytes: int, expected_rows: int | None = None):
        """`expected_rows`: about how many rows the shard holds (the driver knows the dataset's);
        when the first window shows that many rows would not fit, nothing is recorded at all,
        so a streaming worker's memory stays flat instead of growing up to `max_bytes`."""
        self.shard = shard
        self.max_bytes = max_bytes
        self.expected_rows = expected_rows
        self.windows: list[pa.Table] | None = None
        self.rows_per_window: int | None = None

    def iter_windows(self, rows_per_window: int, prefetch_batches: int = 1) -> Iterator[pa.Table]:
        if self.windows is not None and self.rows_per_window == rows_per_window:
            yield from self.windows
            return
        recorded: list[pa.Table] | None = [] if self.max_bytes > 0 else None
        size = 0
        for table in self.shard.iter_batches(batch_size=rows_per_window, batch_format="pyarrow",
                                             prefetch_batches=prefetch_batches):
            if recorded is not None and not recorded and self.expected_rows and table.num_rows \
                    and table.nbytes / table.num_rows * self.expected_rows > self.max_bytes:
                recorded = None  # will not fit: stream every epoch, hold nothing
            if recorded is not None:
                size += table.nbytes
                if size <= self.max_bytes:
                    recorded.append(table)
                else:
                    recorded = None  # too big: stream every epoch
            yield table
        if recorded is not None:  # only a complete pass is replayed
            self.windows, self.rows_per_window = recorded, rows_per_window

    def batches(self, *, collate, batch_size: int, window: int, column: str, seed: int, epoch: int,
                rank: int = 0) -> Iterable:
        """Collated batches for one epoch: bucketed within windows of `window` batches when
        `window > 1` (see `bucketed_batches` for the seeds), else in stream order."""
        if window <= 1:
            return map(collate, (piece for table in self.iter_windows(batch_size)
                                 for piece in _slices(table, batch_size)))
        windows = self.iter_windows(window_rows(batch_size, window))
        return map(collate, bucketed_batches(windows, batch_size, column, seed, epoch, rank))


def window_rows(batch_size: int, window: int) -> int:
    """Rows per window a shard is read in: `window` batches, or one batch without bucketing. A
    pass that reads the shard in these windows fills the cache that the epochs replay."""
    return window * batch_size if window > 1 else batch_size


def _slices(table: pa.Table, batch_size: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, batch_size):
        yield table.slice(start, batch_size)
