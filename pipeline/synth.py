"""A learnable synthetic sequence-classification dataset that needs memory over time.

Each sequence is Gaussian noise, except that its first `marker_steps` steps carry a class-specific
+-`signal` pattern (a fixed random codebook, one pattern per class). The classifier reads the
LSTM's state at the *last* valid step, so it must carry what it saw at the start across the rest
of the sequence: a model that forgets scores at chance (1 / num_classes).

    lstm-pipeline data synth --out data/synth --rows 8000 --val-rows 2000 --min-length 10
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.shards import sequence_array
from pipeline.storage import Output


@dataclass
class SynthSpec:
    rows: int = 8000
    val_rows: int = 2000
    n_features: int = 8
    num_classes: int = 4
    min_length: int = 10
    max_length: int = 40
    marker_steps: int = 3
    signal: float = 1.0
    noise: float = 1.0
    shards: int = 4
    seed: int = 0

    def check(self) -> None:
        problems = []
        if self.rows < 1 or self.val_rows < 0:
            problems.append("--rows must be >= 1 and --val-rows >= 0")
        if self.num_classes < 2:
            problems.append("--classes must be >= 2")
        if self.n_features < 1:
            problems.append("--features must be >= 1")
        if not 1 <= self.marker_steps <= self.min_length <= self.max_length:
            problems.append("need 1 <= marker steps <= --min-length <= --max-length")
        if self.shards < 1:
            problems.append("--shards must be >= 1")
        if problems:
            raise DataError("; ".join(problems))


def _table(rng: np.random.Generator, codebook: np.ndarray, rows: int, spec: SynthSpec,
           first_id: int) -> pa.Table:
    lengths = rng.integers(spec.min_length, spec.max_length + 1, size=rows)
    labels = rng.integers(0, spec.num_classes, size=rows)
    total = int(lengths.sum())
    values = rng.standard_normal((total, spec.n_features), dtype=np.float32) * np.float32(spec.noise)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for k in range(spec.marker_steps):
        values[starts + k] += codebook[labels, k]
    seqs = sequence_array(values, np.concatenate([[0], np.cumsum(lengths)]))
    return pa.table({
        "id": pa.array(np.arange(first_id, first_id + rows, dtype=np.int64)),
        "features": seqs,
        "label": pa.array(labels.astype(np.int64)),
    })


def write_synthetic(out: str, spec: SynthSpec, overwrite: bool = False) -> dict[str, int]:
    """Write `out/train/*.parquet` and `out/val/*.parquet`; returns row counts per split.

    All-or-nothing, and only over an output of this project (`pipeline.storage.Output`).
    """
    spec.check()
    output = Output(out, "synth", overwrite=overwrite)
    codebook = np.random.default_rng(spec.seed).choice(
        [-spec.signal, spec.signal], size=(spec.num_classes, spec.marker_steps, spec.n_features)
    ).astype(np.float32)
    counts = {}
    with output.staged() as tmp:
        next_id = 0
        for split, rows in (("train", spec.rows), ("val", spec.val_rows)):
            if rows == 0:
                continue
            os.makedirs(os.path.join(tmp, split))
            shards = min(spec.shards, rows)
            for i, part in enumerate(np.array_split(np.arange(rows), shards)):
                rng = np.random.default_rng([spec.seed, 1 if split == "train" else 2, i])
                table = _table(rng, codebook, len(part), spec, next_id)
                next_id += len(part)
                pq.write_table(table, os.path.join(tmp, split, f"part-{i:05d}.parquet"))
            counts[split] = rows
    return counts
