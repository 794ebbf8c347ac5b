"""Shared pieces of the benchmark scripts: data, the seed tutorial's model and loop, Ray, MLflow."""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.pop("RAY_ADDRESS", None)  # every benchmark starts (and stops) its own local Ray

import numpy as np  # noqa: E402


def add_size_args(ap, rows=10_000, val_rows=2_000, length=100, features=16, hidden=128,
                  batch=256, epochs=4, rounds=3) -> None:
    """The full-size defaults; pass smaller values for a quick check."""
    ap.add_argument("--rows", type=int, default=rows, help="training sequences")
    ap.add_argument("--val-rows", type=int, default=val_rows, help="validation sequences")
    ap.add_argument("--length", type=int, default=length, help="time steps per sequence (T)")
    ap.add_argument("--features", type=int, default=features, help="features per step (F)")
    ap.add_argument("--hidden", type=int, default=hidden, help="LSTM hidden size")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--batch", type=int, default=batch,
                    help="global batch: each of P processes/workers takes batch/P")
    ap.add_argument("--epochs", type=int, default=epochs,
                    help="epochs per run; steady state = epochs 2..N")
    ap.add_argument("--rounds", type=int, default=rounds, help="alternating rounds; medians reported")
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temp dir)")


def workdir(args) -> str:
    return args.work or tempfile.mkdtemp(prefix="bench-", dir="/tmp")


def write_data(out: str, args, shards: int = 8, min_length: int | None = None,
               max_length: int | None = None) -> str:
    from pipeline.synth import SynthSpec, write_synthetic

    spec = SynthSpec(rows=args.rows, val_rows=args.val_rows, n_features=args.features,
                     num_classes=args.classes, min_length=min_length or args.length,
                     max_length=max_length or args.length, shards=shards)
    write_synthetic(out, spec, overwrite=True)
    return out


def parquet_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".parquet"))


def load_in_memory(directory: str):
    """All shards of a directory as padded tensors (x [N, T, F], lengths [N], y [N])."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.model import pad_arrow

    table = pq.read_table(parquet_files(directory), columns=["features", "label"])
    x, lengths, _ = pad_arrow(table.column("features"))
    y = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(lengths), torch.from_numpy(y)


def seed_model(n_features: int, hidden: int, classes: int):
    """The seed tutorial's LSTMModel, fixed only as far as needed to run: h0/c0 used an undefined
    global `hidden_size` (now the module's own). Reads out[:, -1], right for fixed-length data."""
    import torch
    import torch.nn as nn

    class LSTMModel(nn.Module):
        def __init__(self, input_size, hidden_size, output_size):
            super().__init__()
            self.hidden_size = hidden_size
            self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
            self.fc = nn.Linear(hidden_size, output_size)

        def forward(self, x):
            h0 = torch.zeros(1, x.size(0), self.hidden_size)
            c0 = torch.zeros(1, x.size(0), self.hidden_size)
            out, _ = self.lstm(x, (h0, c0))
            return self.fc(out[:, -1, :])

    return LSTMModel(n_features, hidden, classes)


def plain_loop(x, y, args, threads: int, lr: float = 5e-3) -> dict[str, Any]:
    """The seed's loop over tensors in memory (shuffled batches each epoch). Returns per-epoch
    training seconds."""
    import torch
    import torch.nn as nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = seed_model(x.shape[2], args.hidden, args.classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    times = []
    for _ in range(args.epochs):
        t = time.perf_counter()
        order = torch.randperm(len(y))
        for s in range(0, len(y), args.batch):
            idx = order[s:s + args.batch]
            optimizer.zero_grad()
            loss = nn.CrossEntropyLoss()(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - t)
    return {"epoch_seconds": times}


def steady_rate(rows: int, epoch_seconds: list[float]) -> float:
    """Sequences/s over epochs 2..N (all epochs if there is only one)."""
    later = epoch_seconds[1:] or epoch_seconds
    return rows * len(later) / sum(later)


def start_ray(num_cpus: int):
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-b-", dir="/tmp"))


def train_config(data: str, work: str, args, overrides: list[str] = ()):
    """The default training config (conf/train.yaml) on the benchmark's data and sizes."""
    from pipeline.config import TrainJobConfig, load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_config(TrainJobConfig, os.path.join(root, "conf", "train.yaml"), [
        f"data.train_path={data}/train", f"data.val_path={data}/val",
        f"data.num_classes={args.classes}",
        f"model.hidden_size={args.hidden}", f"train.epochs={args.epochs}",
        f"train.storage_path={work}/ray_results",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        f"tracking.artifact_location={work}/mlartifacts",
        "tracking.registered_model_name=null",
    ] + list(overrides))


def epoch_history(tracking_uri: str, run_id: str, key: str) -> list[float]:
    from pipeline import tracking

    hist = tracking.client(tracking_uri).get_metric_history(run_id, key)
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


def run_pipeline(data: str, work: str, args, overrides: list[str] = ()) -> dict[str, Any]:
    """`lstm-pipeline train` in-process (run_training), Ray started and stopped inside."""
    from pipeline.train import run_training

    cfg = train_config(data, work, args, overrides)
    start = time.perf_counter()
    res = run_training(cfg, console=lambda _: None)
    wall = time.perf_counter() - start
    sps = epoch_history(res.tracking_uri, res.run_id, "sequences_per_second")
    wait = epoch_history(res.tracking_uri, res.run_id, "data_wait_fraction")
    epoch_seconds = [args.rows / r for r in sps]
    return {"epoch_seconds": epoch_seconds, "wall": wall, "val_accuracy": res.val_accuracy,
            "data_wait_fraction": wait, "run_id": res.run_id, "tracking_uri": res.tracking_uri,
            "model_uri": res.model_uri}


def median(values):
    return statistics.median(values) if values else float("nan")


def verdict(ratio: float, target: float, higher: bool = True) -> str:
    ok = ratio >= target if higher else ratio <= target
    return "PASS" if ok else "FAIL"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
