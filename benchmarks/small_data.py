"""Small jobs: the pipeline against a plain PyTorch loop on a ~300-row dataset, 30 epochs.

    python benchmarks/small_data.py                  # 270 rows like JapaneseVowels, 30 epochs
    python benchmarks/small_data.py --rounds 3       # medians of alternating rounds

Both sides train the same model (pipeline.model.LSTMClassifier, hidden 64) with the same global
batch (16) and epochs, and evaluate on the validation rows after every epoch. The plain loop has
the data in memory as padded tensors, one process, 2 threads. The pipeline is `lstm-pipeline
train` in-process: a local Ray started and stopped inside, 2 DDP workers, MLflow in SQLite, the
model logged and registered. Printed per round and as medians:
- the pipeline's wall time per epoch beyond the epoch's own compute (target <= 0.2 s),
- its fixed cost: everything but the epochs (target <= 20 s), phase by phase,
- the wall-time ratio pipeline / plain loop,
- batch predict of the validation rows with the registered model: its wall time, all of it fixed
  cost at this size (target <= 10 s).
"""

from __future__ import annotations

import argparse
import os
import time

import common  # noqa: F401  (sys.path, quiet libraries)
import numpy as np


def plain(x, lengths, y, vx, vl, vy, epochs: int, batch: int) -> float:
    """Seconds for `epochs` epochs of train + validation, data already in memory."""
    import torch
    import torch.nn.functional as F

    from pipeline.model import LSTMClassifier

    torch.set_num_threads(2)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = LSTMClassifier(x.shape[2], int(y.max()) + 1, hidden_size=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y))
        for s in range(0, len(y), batch):
            idx = order[s:s + batch]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx], lengths[idx]), y[idx]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            float(F.cross_entropy(model(vx, vl), vy))
    return time.perf_counter() - start


def pipeline_round(data: str, work: str, epochs: int) -> dict:
    from pipeline import tracking
    from pipeline.config import PredictJobConfig, TrainJobConfig, load_config
    from pipeline.predict import run_prediction
    from pipeline.train import run_training

    name = f"small-{os.getpid()}-{time.time_ns()}"
    cfg = load_config(TrainJobConfig, None, [
        f"data.train_path={data}/train", f"data.val_path={data}/val", "data.batch_size=8",
        f"train.epochs={epochs}", f"train.storage_path={work}/ray_results",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        f"tracking.artifact_location={work}/mlartifacts", f"tracking.registered_model_name={name}"])
    start = time.perf_counter()
    res = run_training(cfg, console=lambda _: None)
    wall = time.perf_counter() - start
    mlc = tracking.client(res.tracking_uri)
    metrics = mlc.get_run(res.run_id).data.metrics
    compute = [m.value for m in mlc.get_metric_history(res.run_id, "epoch_seconds")]
    per_epoch = metrics["time_epochs_s"] / len(compute) - float(np.mean(compute))
    pcfg = load_config(PredictJobConfig, None, [
        f"predict.model=models:/{name}@current", f"predict.input_path={data}/val",
        f"predict.output_path={work}/predictions-{name}", f"tracking.tracking_uri={res.tracking_uri}"])
    t = time.perf_counter()
    run_prediction(pcfg, console=lambda _: None)
    predict_wall = time.perf_counter() - t
    phases = {k[len("time_"):-len("_s")]: v for k, v in metrics.items()
              if k.startswith("time_") and k.endswith("_s")}
    return {"wall": wall, "overhead_per_epoch": per_epoch, "compute_per_epoch": float(np.mean(compute)),
            "fixed": wall - metrics["time_epochs_s"], "phases": phases, "predict": predict_wall,
            "val_accuracy": res.val_accuracy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=270)
    ap.add_argument("--val-rows", type=int, default=370)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    from pipeline.synth import SynthSpec, write_synthetic

    work = common.workdir(argparse.Namespace(work=None))
    data = os.path.join(work, "data")
    # JapaneseVowels' shape: 12 channels, 9 classes, 7-29 steps.
    write_synthetic(data, SynthSpec(rows=args.rows, val_rows=args.val_rows, n_features=12,
                                    num_classes=9, min_length=7, max_length=29, shards=1))
    x, lengths, y = common.load_in_memory(os.path.join(data, "train"))
    vx, vl, vy = common.load_in_memory(os.path.join(data, "val"))
    print(f"data: {args.rows} training and {args.val_rows} validation rows, 7-29 steps x 12, "
          f"9 classes; {args.epochs} epochs, global batch 16; scratch {work}", flush=True)
    plains, rounds = [], []
    for r in range(args.rounds):
        plains.append(plain(x, lengths, y, vx, vl, vy, args.epochs, 16))
        rounds.append(pipeline_round(data, work, args.epochs))
        p = rounds[-1]
        print(f"round {r + 1}: plain {plains[-1]:.1f}s; pipeline {p['wall']:.1f}s "
              f"(epochs {p['phases']['epochs']:.1f}s, fixed {p['fixed']:.1f}s, "
              f"{p['overhead_per_epoch']:.3f}s/epoch beyond {p['compute_per_epoch']:.3f}s of compute), "
              f"val_acc {p['val_accuracy']:.3f}; predict {p['predict']:.1f}s", flush=True)
    med = common.median
    overhead = med([p["overhead_per_epoch"] for p in rounds])
    fixed = med([p["fixed"] for p in rounds])
    predict = med([p["predict"] for p in rounds])
    wall, base = med([p["wall"] for p in rounds]), med(plains)
    phases = {k: med([p["phases"].get(k, 0.0) for p in rounds]) for k in rounds[0]["phases"]}
    print("\nfixed cost by phase (median):")
    print(common.table([[k, f"{v:.2f}s"] for k, v in phases.items() if k not in ("total", "epochs")],
                       ["phase", "seconds"]))
    print(f"\nper-epoch wall beyond compute: {overhead:.3f}s  "
          f"[{common.verdict(overhead, 0.2, higher=False)} <= 0.2s]")
    print(f"fixed cost (all but epochs):   {fixed:.1f}s  [{common.verdict(fixed, 20, higher=False)} <= 20s]")
    print(f"predict {args.val_rows} rows:            {predict:.1f}s  "
          f"[{common.verdict(predict, 10, higher=False)} <= 10s]")
    print(f"wall: pipeline {wall:.1f}s / plain {base:.1f}s = {wall / base:.1f}x")


if __name__ == "__main__":
    main()
