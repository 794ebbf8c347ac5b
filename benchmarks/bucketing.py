"""Variable length: naive padding vs length bucketing on a skewed length distribution.

    python benchmarks/bucketing.py                          # 10k sequences, lengths 10..400
    python benchmarks/bucketing.py --rows 2000 --val-rows 400 --max-length 120 --hidden 32 \\
        --epochs 3 --rounds 1                               # a quick check (speed only)

The data is the synthetic task of `lstm-pipeline data synth` (a class-specific pattern in the
first steps, noise after it) with skewed lengths: `--long-fraction` of the sequences (default
10%) have a length uniform in [--min-length, --max-length], the rest uniform in
[--min-length, --short-max] (defaults 10..400 and 10..50). Rows are in random order in the shards.

Both sides are `run_training` with the default config (2 workers x 1 CPU), rounds alternating:
`data.bucket_window=0` (naive: each batch pads to its longest row) and `data.bucket_window=W`
(the default, 8). Reported: median training-pass seconds per epoch over epochs 2..N (from the
per-epoch `sequences_per_second` metric), median whole-epoch seconds (with validation), the best
validation accuracy, and the padding fraction of the batches each side builds (computed here
from the same lengths). Targets: >= 1.5x faster per epoch, validation accuracy within
--acc-tolerance.

Run the default 10 epochs when the accuracy matters: the long rows need the LSTM to carry the
class pattern for up to 400 steps, and learning that comes as a jump at a point that varies
from run to run. After 3 epochs, runs of the same side ended at 0.56, 0.74 or 0.98 (naive and
bucketed alike), so a short run compares luck, not the batching.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def skewed_lengths(rng, n: int, args):
    import numpy as np

    long = rng.random(n) < args.long_fraction
    return np.where(long, rng.integers(args.min_length, args.length + 1, size=n),
                    rng.integers(args.min_length, args.short_max + 1, size=n))


def write_skewed(out: str, args, shards: int = 8) -> str:
    """Shards like pipeline.synth's, with skewed lengths."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    codebook = rng.choice([-1.0, 1.0], size=(args.classes, 3, args.features)).astype(np.float32)
    next_id = 0
    for split, rows in (("train", args.rows), ("val", args.val_rows)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for i, part in enumerate(np.array_split(np.arange(rows), shards)):
            n = len(part)
            lengths = skewed_lengths(rng, n, args)
            labels = rng.integers(0, args.classes, size=n)
            total = int(lengths.sum())
            values = rng.standard_normal((total, args.features), dtype=np.float32)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            for k in range(3):
                values[starts + k] += codebook[labels, k]
            steps = pa.ListArray.from_arrays(
                pa.array(np.arange(0, (total + 1) * args.features, args.features, dtype=np.int32)),
                pa.array(values.reshape(-1)))
            seqs = pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), steps)
            pq.write_table(pa.table({
                "id": pa.array(np.arange(next_id, next_id + n, dtype=np.int64)),
                "features": seqs, "label": pa.array(labels.astype(np.int64))}),
                os.path.join(out, split, f"part-{i:05d}.parquet"))
            next_id += n
    return out


def padding(data: str, batch: int, window: int) -> float:
    """Padding fraction of one worker-sized stream of batches, naive or bucketed."""
    import pyarrow.parquet as pq

    from pipeline.batching import bucketed_batches, padding_fraction, sequence_lengths

    table = pq.read_table(common.parquet_files(os.path.join(data, "train")), columns=["features"])
    if window <= 1:
        return padding_fraction(sequence_lengths(table.slice(s, batch), "features")
                                for s in range(0, table.num_rows, batch))
    windows = [table.slice(s, window * batch) for s in range(0, table.num_rows, window * batch)]
    return padding_fraction(sequence_lengths(b, "features")
                            for b in bucketed_batches(windows, batch, "features", 0, 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_args(ap, length=400, epochs=10)
    ap.add_argument("--min-length", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=400, dest="length",
                    help="longest sequence (same as --length)")
    ap.add_argument("--short-max", type=int, default=50)
    ap.add_argument("--long-fraction", type=float, default=0.1)
    ap.add_argument("--window", type=int, default=None,
                    help="bucket_window of the bucketed side (default 8)")
    ap.add_argument("--acc-tolerance", type=float, default=0.02,
                    help="largest validation-accuracy drop that counts as equal")
    args = ap.parse_args()

    window = args.window if args.window is not None else 8
    work = common.workdir(args)
    data = write_skewed(os.path.join(work, "data"), args)
    per_worker = args.batch // 2
    print(f"data: {args.rows} train / {args.val_rows} val sequences, lengths {args.min_length}.."
          f"{args.length} ({1 - args.long_fraction:.0%} <= {args.short_max}), F={args.features}, "
          f"{args.classes} classes; hidden {args.hidden}; batch {per_worker} per worker x 2; "
          f"{args.epochs} epochs; window {window}; scratch {work}", flush=True)
    sides = {"naive": ["data.bucket_window=0"], "bucketed": [f"data.bucket_window={window}"]}
    res: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name, overrides in sides.items():
            out = common.run_pipeline(data, work, args, [f"data.batch_size={per_worker}"] + overrides)
            steady = out["epoch_seconds"][1:] or out["epoch_seconds"]
            out["train_s"] = common.median(steady)
            whole = common.epoch_history(out["tracking_uri"], out["run_id"], "epoch_seconds")
            out["epoch_s"] = common.median(whole[1:] or whole)
            res[name].append(out)
            print(f"round {r + 1} {name:9s} train pass {out['train_s']:.2f}s/epoch  whole epoch "
                  f"{out['epoch_s']:.2f}s  best val_accuracy {out['val_accuracy']:.4f}  "
                  f"wall {out['wall']:.0f}s", flush=True)

    med = {k: {m: common.median([o[m] for o in v]) for m in ("train_s", "epoch_s", "val_accuracy")}
           for k, v in res.items()}
    pad = {"naive": padding(data, per_worker, 0), "bucketed": padding(data, per_worker, window)}
    print()
    print(common.table([[k, f"{v['train_s']:.2f}", f"{v['epoch_s']:.2f}", f"{v['val_accuracy']:.4f}",
                         f"{pad[k]:.0%}"] for k, v in med.items()],
                       ["side", "train pass s/epoch", "whole epoch s", "val_accuracy", "padding"]))
    print()
    speedup = med["naive"]["train_s"] / med["bucketed"]["train_s"]
    drop = med["naive"]["val_accuracy"] - med["bucketed"]["val_accuracy"]
    print(f"target bucketed >= 1.5x faster per epoch (training pass): {speedup:.2f}x  "
          f"{common.verdict(speedup, 1.5)}")
    whole = med["naive"]["epoch_s"] / med["bucketed"]["epoch_s"]
    print(f"(whole epoch incl. validation: {whole:.2f}x)")
    print(f"target equal validation accuracy (drop <= {args.acc_tolerance}): drop {drop:+.4f}  "
          f"{common.verdict(drop, args.acc_tolerance, higher=False)}")


if __name__ == "__main__":
    main()
