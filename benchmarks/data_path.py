"""Data path: Parquet shard -> padded batch tensors, Ray Data vs raw pyarrow; and the data wait.

    python benchmarks/data_path.py                          # full-size defaults, 3 rounds
    python benchmarks/data_path.py --rows 2000 --val-rows 400 --length 20 --hidden 32 \\
        --epochs 2 --rounds 1                               # a quick check

1. Read path, same shards, same output (zero-padded float32 [B, T, F] tensors + lengths +
   labels), rounds alternating:
   - raw:      `pyarrow.parquet.read_table(files)` -> one contiguous padded array, sliced into batches
   - ray-v1:   the training path: `pipeline.data.read_parquet_columns` (Ray Data's V1 Parquet
               datasource, our default `data.parquet_reader`) + `iter_torch_batches(collate_fn=
               SequenceCollate)`
   - ray-v2:   the same with `data.parquet_reader=v2` (Ray 2.60's default datasource)
   Each Ray side is iterated on a running local Ray (2 CPUs), twice per round; the first pass
   (read tasks' worker start) and the second are both shown, the ratio uses the second.
2. Data wait: `run_training` (default config) on the same data; the per-epoch metric
   `data_wait_fraction` (rank 0's seconds waiting for the next batch / its training pass),
   epochs 2..N. Target < 5%.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_args(ap, epochs=3)
    ap.add_argument("--skip-wait", action="store_true", help="only the read path (no training)")
    args = ap.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import ray
    import torch
    from pipeline.data import SequenceCollate, read_parquet_columns
    from pipeline.model import ModelSpec, pad_arrow
    from pipeline.task import Classification

    work = common.workdir(args)
    data = common.write_data(os.path.join(work, "data"), args)
    files = common.parquet_files(os.path.join(data, "train"))
    print(f"data: {args.rows} sequences in {len(files)} shards, T={args.length}, F={args.features}; "
          f"batch {args.batch}; scratch {work}", flush=True)

    def raw() -> float:
        start = time.perf_counter()
        table = pq.read_table(files, columns=["features", "label"])
        x, lengths, _ = pad_arrow(table.column("features"))
        y = table.column("label").to_numpy().astype(np.int64)
        n = 0
        for s in range(0, len(y), args.batch):  # batches as tensors, as a training loop takes them
            xb = torch.from_numpy(x[s:s + args.batch])
            torch.from_numpy(lengths[s:s + args.batch]), torch.from_numpy(y[s:s + args.batch])
            n += len(xb)
        assert n == args.rows
        return n / (time.perf_counter() - start)

    collate = SequenceCollate("features", "label",
                              Classification(ModelSpec(n_features=args.features, num_outputs=args.classes)),
                              args.features)

    def ray_side(v2: bool) -> list[float]:
        rates = []
        for _ in range(2):
            start = time.perf_counter()
            ds = read_parquet_columns(files, ["features", "label"], "v2" if v2 else "v1")
            n = 0
            for batch in ds.iter_torch_batches(batch_size=args.batch, collate_fn=collate, device="cpu"):
                n += len(batch["label"])
            assert n == args.rows
            rates.append(n / (time.perf_counter() - start))
        return rates

    common.start_ray(2)
    res = {"raw": [], "ray-v2": [], "ray-v1": []}
    for r in range(args.rounds):
        res["raw"].append(raw())
        v2 = ray_side(True)
        v1 = ray_side(False)
        res["ray-v2"].append(v2[1])
        res["ray-v1"].append(v1[1])
        print(f"round {r + 1}: raw {res['raw'][-1]:.0f} rows/s  ray-v2 {v2[0]:.0f} then {v2[1]:.0f}  "
              f"ray-v1 {v1[0]:.0f} then {v1[1]:.0f} rows/s", flush=True)
    ray.shutdown()

    med = {k: common.median(v) for k, v in res.items()}
    print()
    print(common.table([[k, f"{v:.0f}", f"{v / med['raw']:.2f}"] for k, v in med.items()],
                       ["read path", "rows/s (median)", "x raw"]))
    print()
    for side in ("ray-v2", "ray-v1"):
        ratio = med[side] / med["raw"]
        print(f"target {side} >= 0.8x raw pyarrow: {ratio:.2f}x  {common.verdict(ratio, 0.8)}")
    if args.skip_wait:
        return

    out = common.run_pipeline(data, work, args, [f"data.batch_size={args.batch // 2}"])
    waits = out["data_wait_fraction"]
    steady = waits[1:] or waits
    worst = max(steady)
    print()
    print(f"data wait per epoch (rank 0): {' '.join(f'{w:.1%}' for w in waits)}  "
          f"(steady-state epochs: max {worst:.1%})")
    print(f"target data wait < 5% of step time: {worst:.1%}  {common.verdict(worst, 0.05, higher=False)}")


if __name__ == "__main__":
    main()
