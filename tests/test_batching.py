"""Length bucketing (pipeline/batching.py): pure functions over Arrow tables, no Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.batching import ShardCache, bucketed_batches, padding_fraction, sequence_lengths
from pipeline.config import DataConfig, load_config, TrainJobConfig
from pipeline.data import SequenceCollate
from pipeline.model import ModelSpec
from pipeline.task import Classification
from pipeline.errors import ConfigError


def make_table(lengths, n_features=2) -> pa.Table:
    lengths = np.asarray(lengths, dtype=np.int32)
    total = int(lengths.sum())
    steps = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (total + 1) * n_features, n_features, dtype=np.int32)),
        pa.array(np.ones(total * n_features, dtype=np.float32)))
    seqs = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                                    steps)
    return pa.table({"id": pa.array(np.arange(len(lengths), dtype=np.int64)), "features": seqs,
                     "label": pa.array(np.arange(len(lengths)) % 3, type=pa.int64())})


def skewed_lengths(n, seed=0):
    rng = np.random.default_rng(seed)
    short = rng.integers(10, 40, size=n)
    long = rng.integers(200, 400, size=n)
    return np.where(rng.random(n) < 0.1, long, short)


def windows_of(table: pa.Table, rows: int):
    return [table.slice(s, rows) for s in range(0, table.num_rows, rows)]


def run(table, batch_size=16, window=4, seed=0, epoch=0, rank=0):
    return list(bucketed_batches(windows_of(table, window * batch_size), batch_size, "features",
                                 seed, epoch, rank))


def test_every_row_once_and_batch_count_unchanged():
    table = make_table(skewed_lengths(1000))
    batches = run(table)
    ids = np.concatenate([b.column("id").to_numpy() for b in batches])
    assert sorted(ids.tolist()) == list(range(1000))
    # Same number of batches as plain batching (DDP workers must step together).
    assert len(batches) == -(-1000 // 16)
    assert sum(b.num_rows < 16 for b in batches) == 1


def test_rows_stay_in_their_window_and_batches_are_length_sorted():
    lengths = skewed_lengths(640)
    table = make_table(lengths)
    batches = run(table, batch_size=16, window=4)
    for w in range(0, len(batches), 4):
        window = batches[w:w + 4]
        ids = np.concatenate([b.column("id").to_numpy() for b in window])
        assert ids.min() // 64 == ids.max() // 64  # one window of 4 x 16 rows
        # Sorted within the window: batches do not overlap in length ranges.
        ranges = sorted((sequence_lengths(b, "features").min(), sequence_lengths(b, "features").max())
                        for b in window)
        for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
            assert hi <= lo
        for b in window:
            lens = sequence_lengths(b, "features")
            assert (lens == lengths[b.column("id").to_numpy()]).all()


def test_order_differs_between_epochs_and_seeds_but_is_deterministic():
    table = make_table(skewed_lengths(2000))

    def order(**kw):
        return [tuple(b.column("id").to_numpy()[:3]) for b in run(table, **kw)]

    assert order(epoch=1) == order(epoch=1)
    assert order(epoch=1) != order(epoch=2)
    assert order(seed=1) != order(seed=2)
    assert order(rank=0) != order(rank=1)


def test_every_rank_takes_its_batches_in_the_same_length_order():
    """DDP waits at each step for the slowest rank: the k-th batch of a window must be of the same
    length rank on every worker (an independent order per rank made bucketing 2x slower)."""
    table = make_table(skewed_lengths(2000))

    def maxes(rank):
        return [int(sequence_lengths(b, "features").max()) for b in run(table, rank=rank)]

    assert maxes(0) == maxes(1) and len(set(maxes(0))) > 3


def test_padding_fraction_drops_on_skewed_lengths():
    lengths = skewed_lengths(4096)
    table = make_table(lengths)
    naive = padding_fraction(lengths[s:s + 64] for s in range(0, len(lengths), 64))
    bucketed = padding_fraction(sequence_lengths(b, "features") for b in run(table, batch_size=64, window=8))
    assert naive > 0.6
    assert bucketed < naive / 2


def test_fixed_length_data_keeps_its_order():
    table = make_table(np.full(300, 25))
    batches = run(table, batch_size=16, window=8)
    ids = np.concatenate([b.column("id").to_numpy() for b in batches])
    assert ids.tolist() == list(range(300))


def test_bucketed_batches_collate():
    table = make_table(skewed_lengths(200))
    collate = SequenceCollate("features", "label", Classification(ModelSpec(n_features=2, num_outputs=3)), 2)
    for b in run(table, batch_size=32, window=4):
        out = collate(b)
        assert out["x"].shape == (b.num_rows, int(out["lengths"].max()), 2)
        assert out["label"].shape == (b.num_rows,)


def test_config_key():
    cfg = load_config(TrainJobConfig, Path(__file__).parent.parent / "conf" / "train.yaml", ["data.bucket_window=0"])
    assert cfg.data.bucket_window == 0
    with pytest.raises(ConfigError, match="bucket_window"):
        DataConfig(bucket_window=-1)


class _Stream:
    """Stands in for a Ray Data shard iterator (Ray's, not ours): counts the passes made."""

    def __init__(self, table):
        self.table, self.passes = table, 0

    def iter_batches(self, batch_size, batch_format, prefetch_batches=1):
        self.passes += 1
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


def _ids(batches):
    return [b.column("id").to_pylist() for b in batches]


def test_a_shard_that_fits_is_replayed_from_memory_with_the_same_batches():
    table = make_table(skewed_lengths(500))
    stream = _Stream(table)
    cache = ShardCache(stream, max_bytes=table.nbytes * 2, expected_rows=500)
    batching = dict(collate=lambda b: b, batch_size=16, window=4, column="features", seed=0, epoch=1)
    first = _ids(cache.batches(**batching))
    again = _ids(cache.batches(**batching))
    assert stream.passes == 1 and first == again  # replayed, not re-read
    assert sorted(sum(first, [])) == list(range(500))


def test_a_shard_that_does_not_fit_streams_and_holds_nothing():
    table = make_table(skewed_lengths(500))
    for expected_rows in (500, None):  # known too big up front, or found out while streaming
        stream = _Stream(table)
        cache = ShardCache(stream, max_bytes=table.nbytes // 3, expected_rows=expected_rows)
        for _ in range(2):
            batches = cache.batches(collate=lambda b: b, batch_size=16, window=1, column="features",
                                    seed=0, epoch=0)
            assert sorted(sum(_ids(batches), [])) == list(range(500))
        assert stream.passes == 2 and cache.windows is None
