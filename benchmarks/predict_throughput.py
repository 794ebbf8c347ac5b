"""Batch predict vs a raw `torch.inference_mode` loop: same model, same Parquet rows, one run.

    .venv/bin/python benchmarks/predict_throughput.py                 # 1M rows, 3 rounds
    .venv/bin/python benchmarks/predict_throughput.py --rows 100000 --rounds 5

Both sides start from the same registered model and the same shards on disk and end with
predictions in memory (raw) or written as Parquet (predict). `predict` is timed from the call of
`run_prediction` to its return (model resolution, input checks, Ray Data read, actor start, model
load, write, MLflow logging) on a Ray started beforehand, as a long-lived cluster would be; the
raw loop from loading the model out of the registry to the last batch, in one process with every
core's torch threads. By default only `id` is passed through (no accuracy / confusion matrix,
which the raw loop does not compute either); --with-labels adds them. Rounds alternate; the
script prints each round, the medians and the ratio predict / raw.

Defaults: 1M rows (lengths 10-40, 8 features, hidden 64) and 2 actors x 1 CPU, the layout that
uses both cores of a 2-core machine best (2 processes x 1 thread beat 1 x 2 threads). Below a few
hundred thousand rows the job's fixed start-up (actor processes importing torch, the first read)
is a large share of the whole: see benchmarks/README.md for 100k rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--with-labels", action="store_true",
                    help="also pass labels through and compute accuracy + confusion matrix")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray
    import torch

    from pipeline import tracking
    from pipeline.config import PredictJobConfig, load_config
    from pipeline.model import ModelSpec, build_model, pad_arrow
    from pipeline.task import task_for
    from pipeline.predict import run_prediction
    from pipeline.synth import SynthSpec, write_synthetic

    work = tempfile.mkdtemp(prefix="bench-predict-")
    data = os.path.join(work, "data")
    write_synthetic(data, SynthSpec(rows=args.rows, val_rows=0, shards=8))
    files = sorted(os.path.join(data, "train", f) for f in os.listdir(os.path.join(data, "train")))
    uri = f"sqlite:///{work}/mlflow.db"
    mlc = tracking.client(uri)
    exp = tracking.get_or_create_experiment(mlc, "bench", f"file://{work}/artifacts")
    run_id = tracking.start_run(mlc, exp, "bench-model", {})
    spec = ModelSpec(n_features=8, num_outputs=4, hidden_size=args.hidden)
    torch.manual_seed(0)
    module = build_model(spec)
    example = pq.read_table(files[0]).slice(0, 2).select(["features"]).to_pandas()
    model_uri = tracking.log_model(run_id, uri, module.state_dict(), spec,
                                   task_for(spec).signature(), example)
    tracking.register_model(mlc, model_uri, run_id, "bench", "current", "benchmark", {})
    tracking.end_run(mlc, run_id, "FINISHED")

    def raw() -> float:
        import mlflow.pyfunc

        torch.set_num_threads(os.cpu_count() or 1)
        start = time.perf_counter()
        mlflow_model = mlflow.pyfunc.load_model("models:/bench@current").unwrap_python_model()
        rows = 0
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=args.batch_size, columns=["features"]):
                x, lengths, _ = pad_arrow(batch.column(0))
                probs = mlflow_model.predict_padded(x, lengths)
                rows += len(probs)
        assert rows == args.rows
        return rows / (time.perf_counter() - start)

    def predict(i: int) -> float:
        cfg = load_config(PredictJobConfig, None, [
            "predict.model=models:/bench@current", f"predict.input_path={data}/train",
            f"predict.output_path={work}/out-{i}", f"predict.batch_size={args.batch_size}",
            f"predict.num_actors={args.actors}", f"predict.cpus_per_actor={args.cpus_per_actor}",
            f"tracking.tracking_uri={uri}"]
            + ([] if args.with_labels else ["predict.passthrough_columns=[id]"]))
        start = time.perf_counter()
        res = run_prediction(cfg, console=lambda _: None)
        assert res.rows == args.rows
        return res.rows / (time.perf_counter() - start)

    need = args.actors * args.cpus_per_actor + 1
    ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-b-", dir="/tmp"))
    raws, preds = [], []
    for i in range(args.rounds):
        raws.append(raw())
        preds.append(predict(i))
        print(f"round {i + 1}: raw {raws[-1]:.0f} rows/s   predict {preds[-1]:.0f} rows/s", flush=True)
    ray.shutdown()
    r, p = statistics.median(raws), statistics.median(preds)
    print(f"rows={args.rows} batch={args.batch_size} actors={args.actors}x{args.cpus_per_actor}cpu "
          f"hidden={args.hidden}")
    print(f"median raw {r:.0f} rows/s, predict {p:.0f} rows/s, ratio predict/raw = {p / r:.2f} "
          f"(target >= 0.9)")


if __name__ == "__main__":
    main()
