"""Training throughput: lstm-pipeline vs the seed's plain loop vs PyTorch Lightning, one run.

    python benchmarks/train_throughput.py                      # full-size defaults, 3 rounds
    python benchmarks/train_throughput.py --rows 2000 --val-rows 400 --length 20 --hidden 32 \\
        --epochs 3 --rounds 1                                  # a quick check

Same data (synthetic, fixed length T, F features, C classes), same model size (1-layer LSTM with
`--hidden` units, linear head), same *global* batch (`--batch`: P processes or workers take
batch/P each) and the same number of epochs on every side. Rounds alternate between the sides:

- plain:         the seed tutorial's model and loop over tensors in memory, 1 process, 2 threads
- plain-reuse:   the same with the allocator settings our workers get (`scaling.reuse_memory`,
                 pipeline/runtime.py): shows how much of the pipeline's lead is the allocator
- lightning-1:   LightningModule around the same model, 1 process, 2 threads
- lightning-ddp: the same, DDP over gloo, 2 processes x 1 thread
- pipeline:      `run_training` with conf/train.yaml (2 workers x 1 CPU), reading the Parquet shards
- pipeline-no-reuse: the same with `scaling.reuse_memory=false` (glibc's default allocator)
- pipeline-best: the same with the `--best` overrides (default: no system metrics sampling)

Throughput is the steady state: training sequences / training-pass seconds over epochs 2..N
(epoch 1 pays for warm-up: Ray Data start, first reads). For the pipeline it is read back from
the per-epoch `sequences_per_second` metric in MLflow. Wall time is the whole thing: data load
into memory, process start (DDP), Ray start, validation passes, checkpoints, MLflow logging.
Requires `pip install -e .[bench]` (Lightning).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from pipeline.runtime import REUSE_MEMORY_ENV  # noqa: E402

# The defaults are the fastest settings measured; the one thing left to turn off is the system
# metrics sampler thread on rank 0 (measured: no difference within the noise).
DEFAULT_BEST = ["tracking.system_metrics=false"]


def lightning_child(args) -> None:
    """One Lightning run (1 process, or DDP rank 0 + the rank Lightning launches); rank 0 prints
    'RESULT {json}'."""
    import lightning as L
    import torch
    import torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset

    procs = args.lightning_child
    threads = 1 if procs > 1 else 2
    torch.set_num_threads(threads)
    x, _, y = common.load_in_memory(os.path.join(args.data, "train"))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = common.seed_model(x.shape[2], args.hidden, args.classes)

        def training_step(self, batch, _):
            xb, yb = batch
            return nn.CrossEntropyLoss()(self.model(xb), yb)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=5e-3)

    class Timer(L.Callback):
        def __init__(self):
            self.times, self.t = [], 0.0

        def on_train_epoch_start(self, *_):
            self.t = time.perf_counter()

        def on_train_epoch_end(self, *_):
            self.times.append(time.perf_counter() - self.t)

    torch.manual_seed(0)
    timer = Timer()
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch // procs, shuffle=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=procs, strategy="ddp" if procs > 1 else "auto",
        max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        num_sanity_val_steps=0,
    )
    trainer.fit(Module(), loader)
    if trainer.global_rank == 0:
        print("RESULT " + json.dumps({"epoch_seconds": timer.times}), flush=True)


def plain_child(args) -> None:
    """The seed's loop in this process (its allocator is the one this process started with)."""
    start = time.perf_counter()
    x, _, y = common.load_in_memory(os.path.join(args.data, "train"))
    out = common.plain_loop(x, y, args, threads=2)
    out["wall"] = time.perf_counter() - start
    print("RESULT " + json.dumps(out), flush=True)


def run_child(flag: str, value: int, data: str, args, env: dict[str, str] | None = None) -> dict:
    """This script as a fresh process (`--plain-child` or `--lightning-child`); its RESULT line."""
    cmd = [sys.executable, os.path.abspath(__file__), flag, str(value), "--data", data]
    for key in ("rows", "val_rows", "length", "features", "hidden", "classes", "batch", "epochs"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    start = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{flag} {value} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out.setdefault("wall", wall)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_args(ap)
    ap.add_argument("--best", nargs="*", default=DEFAULT_BEST,
                    help="config overrides of the 'pipeline-best' variant (key=value ...)")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="sides to leave out: plain lightning-1 lightning-ddp pipeline pipeline-best")
    ap.add_argument("--lightning-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--plain-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lightning_child:
        lightning_child(args)
        return
    if args.plain_child:
        plain_child(args)
        return

    work = common.workdir(args)
    data = common.write_data(os.path.join(work, "data"), args)
    print(f"data: {args.rows} train / {args.val_rows} val sequences, T={args.length}, "
          f"F={args.features}, {args.classes} classes; hidden {args.hidden}; global batch "
          f"{args.batch}; {args.epochs} epochs; {args.rounds} rounds; scratch {work}", flush=True)

    # The pipeline's batch is per worker: 2 workers x batch/2 = the same global batch.
    per_worker = f"data.batch_size={args.batch // 2}"
    sides = {
        "plain": lambda: run_child("--plain-child", 1, data, args),
        "plain-reuse": lambda: run_child("--plain-child", 1, data, args, REUSE_MEMORY_ENV),
        "lightning-1": lambda: run_child("--lightning-child", 1, data, args),
        "lightning-ddp": lambda: run_child("--lightning-child", 2, data, args),
        "pipeline": lambda: common.run_pipeline(data, work, args, [per_worker]),
        "pipeline-no-reuse": lambda: common.run_pipeline(data, work, args,
                                                         [per_worker, "scaling.reuse_memory=false"]),
        "pipeline-best": lambda: common.run_pipeline(data, work, args, [per_worker] + args.best),
    }
    sides = {k: v for k, v in sides.items() if k not in args.skip}
    results: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name, fn in sides.items():
            out = fn()
            out["rate"] = common.steady_rate(args.rows, out["epoch_seconds"])
            results[name].append(out)
            extra = ""
            if "data_wait_fraction" in out:
                extra = f"  data wait {max(out['data_wait_fraction'][1:] or out['data_wait_fraction']):.1%}"
            print(f"round {r + 1} {name:14s} {out['rate']:8.0f} seq/s steady  wall {out['wall']:6.1f}s"
                  f"  epochs {' '.join(f'{t:.2f}' for t in out['epoch_seconds'])}s{extra}", flush=True)

    med = {k: common.median([o["rate"] for o in v]) for k, v in results.items()}
    wall = {k: common.median([o["wall"] for o in v]) for k, v in results.items()}
    rows = []
    for name in results:
        rows.append([name, f"{med[name]:.0f}", f"{wall[name]:.1f}",
                     f"{med[name] / med['plain']:.2f}" if "plain" in med else "-",
                     f"{med[name] / med['lightning-ddp']:.2f}" if "lightning-ddp" in med else "-"])
    print()
    print(common.table(rows, ["side", "steady seq/s (median)", "wall s (median)", "x plain",
                              "x lightning-ddp"]))
    print()
    if "pipeline-best" in med:
        print(f"pipeline-best overrides: {' '.join(args.best) or '(none)'}")
    for name in ("pipeline", "pipeline-best"):
        if name not in med:
            continue
        for ref, target in (("plain", 1.25), ("lightning-ddp", 1.05)):
            if ref in med:
                ratio = med[name] / med[ref]
                print(f"target {name} >= {target}x {ref}: {ratio:.2f}x  "
                      f"{common.verdict(ratio, target)}")


if __name__ == "__main__":
    main()
