"""Distributed training: Ray Train `TorchTrainer` runs DDP workers over streamed Parquet shards.

    cfg = load_config(TrainJobConfig, "conf/train.yaml", ["scaling.num_workers=2"])
    result = run_training(cfg)

The driver validates everything first (config, data, MLflow, cluster resources), opens the
MLflow run, runs the trainer, then logs and registers the model from the best checkpoint and
closes the run. `train_loop_per_worker` is the per-worker loop; `train_epoch` and `evaluate` are
plain functions of a model and batches.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import random
import tempfile
import threading
import time
from urllib.parse import urlparse
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from pipeline import report, tracking
from pipeline.config import TrainJobConfig, dump_yaml, flatten, load_config, to_dict
from pipeline.data import (SequenceCollate, TrainData, absolute, filesystem, make_datasets,
                           validate_train_data)
from pipeline.batching import ShardCache
from pipeline.cluster import ray_connection
from pipeline.console import first_line, fit_interruptible, user_error_in
from pipeline.checkpoints import (CHECKPOINT_FILE, check_resume, config_for_resume,  # noqa: F401
                                  resume_checkpoint, resume_point, run_dir_name)
from pipeline.errors import DataError, PipelineError, TrainingError, collect
from pipeline.model import build_model
from pipeline.objective import Objective
from pipeline.redact import redact
from pipeline.runtime import allocator_in_use, worker_env

@dataclass
class TrainResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    model_uri: str
    registered_name: str | None
    version: str | None
    val_accuracy: float
    val_loss: float
    checkpoint_path: str
    val_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    """The best checkpoint's validation metrics (val_loss, val_accuracy or val_mae/rmse/r2)."""


# --------------------------------------------------------------------------- per-worker loop


class NonFiniteLoss(TrainingError):
    """The loss became NaN or inf: training stops instead of going on with broken weights."""


def train_epoch(model, optimizer, batches: Iterable[dict], device, grad_clip: float | None,
                on_step: Callable[[int, float], None], step: int, epoch: int,
                timing: dict[str, float] | None = None,
                loss_fn: Callable | None = None) -> tuple[float, int, int]:
    """One pass over `batches`; returns (summed loss, sequences seen, global step).
    `loss_fn(output, label)` defaults to cross-entropy (see pipeline.objective for regression).

    `timing`, when given, receives "data_wait" (seconds spent waiting for the next batch) and
    "total" (seconds for the whole pass): two clock reads per step, no device sync.
    """
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64)
    seen = 0
    wait = 0.0
    start = tick = time.perf_counter()
    for batch in batches:
        wait += time.perf_counter() - tick
        x = batch["x"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x, batch["lengths"])
        loss = (loss_fn or F.cross_entropy)(logits, y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the training loss became {value} in epoch {epoch + 1} at step "
                                f"{step + 1}: lower train.lr, keep train.grad_clip set, or check "
                                "the data for extreme values")
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        step += 1
        total_loss += value * len(y)
        seen += len(y)
        on_step(step, value)
        tick = time.perf_counter()
    if timing is not None:
        timing.update(data_wait=wait, total=time.perf_counter() - start)
    return float(total_loss), seen, step


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], device,
             confusion: torch.Tensor | None = None) -> tuple[float, int, int]:
    """(summed loss, correct predictions, sequences) over `batches`; adds counts into
    `confusion[true, predicted]` when given."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        x = batch["x"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        logits = model(x, batch["lengths"])
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        predicted = logits.argmax(dim=1)
        correct += int((predicted == y).sum())
        count += len(y)
        if confusion is not None:
            k = confusion.shape[0]
            confusion += torch.bincount(y.cpu() * k + predicted.cpu(), minlength=k * k).view(k, k)
    return loss_sum, correct, count


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _all_reduce_tensor(t: torch.Tensor, device) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.to(device)
    dist.all_reduce(out)
    return out.cpu()


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def make_scheduler(optimizer, cfg: TrainJobConfig):
    if cfg.train.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    if cfg.train.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.train.lr_step_epochs, cfg.train.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _improved(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if metric == "val_accuracy" else value < best


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: its shard of the data, the model, epochs of train/evaluate/report.

    Restarts (a worker died, `--resume`) continue from the latest checkpoint: model, optimizer,
    LR schedule, epoch, step, RNG states and early-stopping state. Metrics already in MLflow for
    the steps and epochs being redone are kept and the redone values skipped, so the history has
    neither gaps nor duplicates.
    """
    import ray.train
    import ray.train.torch

    cfg: TrainJobConfig = config["cfg"]
    meta: dict[str, Any] = config["meta"]
    rank = ray.train.get_context().get_world_rank()
    # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker actually reserved.
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    device = ray.train.torch.get_device()
    # The model's buffers (normalization statistics) are constants: DDP's default broadcast of
    # them before every forward would be one more collective, i.e. one more wait, per step.
    model = ray.train.torch.prepare_model(build_model(meta),
                                          parallel_strategy_kwargs={"broadcast_buffers": False})
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr,
                                 weight_decay=cfg.train.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    start_epoch, step, best, stale = 0, 0, None, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            state = torch.load(os.path.join(path, CHECKPOINT_FILE), map_location="cpu",
                               weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        best, stale = state["best"], state["stale"]

    logger = monitor = None
    if rank == 0:
        logger = tracking.MetricLogger(config["tracking_uri"], config["run_id"])
        logger.mlc.set_tag(config["run_id"], "worker_allocator", allocator_in_use())
        if cfg.tracking.system_metrics:
            # A sampling thread on this node; it stops by itself once the run is no longer RUNNING.
            monitor = tracking.system_metrics_monitor(config["tracking_uri"], config["run_id"],
                                                      cfg.tracking.system_metrics_interval)
    every = cfg.train.log_every_n_steps

    def on_step(step: int, loss: float) -> None:
        if logger is not None and step % every == 0:
            logger.log({"train_loss_step": loss}, step)

    objective = Objective(meta, cfg.train.loss, cfg.train.huber_delta)
    collate = SequenceCollate(cfg.data.features_column, cfg.data.label_column,
                              meta["num_classes"], meta["n_features"], objective.regression)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    # Shards that fit data.cache_mb are streamed once and then replayed from this worker's memory.
    shard_rows = config.get("shard_rows") or {}
    train_cache = ShardCache(train_shard, cfg.data.cache_mb * 2**20, shard_rows.get("train"))
    val_cache = ShardCache(val_shard, cfg.data.cache_mb * 2**20, shard_rows.get("val"))

    def val_batches():
        # Bucketed too: evaluation sums do not depend on the order, and shorter padding is faster.
        return val_cache.batches(collate, cfg.data.batch_size, cfg.data.bucket_window,
                                 cfg.data.features_column, cfg.train.seed, 0, rank)

    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.perf_counter()
        timing: dict[str, float] = {}
        train_batches = train_cache.batches(collate, cfg.data.batch_size, cfg.data.bucket_window,
                                            cfg.data.features_column, cfg.train.seed, epoch, rank)
        loss_sum, seen, step = train_epoch(
            model, optimizer, train_batches, device,
            cfg.train.grad_clip, on_step, step, epoch, timing, loss_fn=objective.loss,
        )
        train_seconds = time.perf_counter() - t0
        if objective.regression:  # loss, MAE, RMSE, R^2 from sums added across workers
            val_sums = objective.evaluate(model, val_batches(), device)
            loss_sum, seen, *val_sums = _all_reduce_sum([loss_sum, seen, *val_sums], device)
            val_loss_sum, count, confusion = val_sums[0], val_sums[1], None
        else:
            confusion = torch.zeros(meta["num_classes"], meta["num_classes"], dtype=torch.int64)
            val_loss_sum, correct, count = evaluate(model, val_batches(),
                                                    device, confusion)
            confusion = _all_reduce_tensor(confusion, device)
            loss_sum, seen, val_loss_sum, correct, count = _all_reduce_sum(
                [loss_sum, seen, val_loss_sum, correct, count], device)
        if count == 0:
            raise TrainingError("the validation set is empty: give data.val_path more rows or "
                                "raise data.val_fraction")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_sum / max(seen, 1),
            "val_loss": val_loss_sum / count,
            **(objective.metrics(val_sums) if objective.regression else {"val_accuracy": correct / count}),
            "learning_rate": lr,
            "sequences_per_second": seen / train_seconds,
            "epoch_seconds": time.perf_counter() - t0,
            # Rank 0's share of its training pass spent waiting for the next batch.
            "data_wait_fraction": timing["data_wait"] / max(timing["total"], 1e-9),
        }
        watched = metrics[cfg.train.early_stopping_metric]
        if _improved(cfg.train.early_stopping_metric, watched, best):
            best, stale = watched, 0
        else:
            stale += 1
        patience = cfg.train.early_stopping_patience
        stop = patience is not None and stale >= patience and epoch + 1 < cfg.train.epochs
        metrics["early_stopped"] = int(stop)
        if rank == 0:
            logger.log({k: v for k, v in metrics.items() if k not in ("epoch", "step", "early_stopped")},
                       epoch + 1)
            logger.flush()
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "best": best,
                    "stale": stale,
                    "rng": _rng_state(),
                    "config": to_dict(cfg),
                    "run_id": config["run_id"],
                    "meta": meta,
                    # The validation confusion matrix of this epoch [true, predicted]: the driver
                    # logs the best checkpoint's as the run's confusion matrix and per-class table.
                    "val_confusion": confusion,
                }, os.path.join(tmp, CHECKPOINT_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            if config.get("progress") is not None:
                config["progress"].put_nowait(metrics)
        else:
            ray.train.report(metrics, checkpoint=None)
        if stop:
            break
    if logger is not None:
        logger.flush(wait=True)
    if monitor is not None:
        monitor.finish()


# --------------------------------------------------------------------------- driver


def _absolute_paths(cfg: TrainJobConfig) -> TrainJobConfig:
    """Every local path made absolute on the driver: Ray workers run in other directories."""
    def fix(p):
        if p is None:
            return None
        return [absolute(x) for x in p] if isinstance(p, list) else absolute(p)

    data = dataclasses.replace(cfg.data, train_path=fix(cfg.data.train_path),
                               val_path=fix(cfg.data.val_path))
    train = dataclasses.replace(cfg.train, storage_path=fix(cfg.train.storage_path))
    return dataclasses.replace(cfg, data=data, train=train)


def check_outputs(cfg: TrainJobConfig) -> None:
    """Before any work: checkpoints, artifacts and a local MLflow store go into directories that
    can be written and that are not the training or validation data."""
    from pipeline.storage import check_apart, check_writable_dir

    check_writable_dir(cfg.train.storage_path, "train.storage_path")
    outputs = {f"train.storage_path {cfg.train.storage_path}": cfg.train.storage_path}
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    if uri.startswith("sqlite:///"):
        outputs[f"the MLflow store {uri}"] = uri[len("sqlite:///"):]
    artifacts = tracking.resolve_artifact_location(uri, cfg.tracking.artifact_location)
    if artifacts and artifacts.startswith("file://"):
        local = urlparse(artifacts).path
        check_writable_dir(local, "tracking.artifact_location")
        outputs[f"the MLflow artifact location {local}"] = local
    inputs = {"data.train_path": cfg.data.train_path}
    if cfg.data.val_path is not None:
        inputs["data.val_path"] = cfg.data.val_path
    # Ray Train and MLflow add their own files and directories there, and delete nothing else.
    check_apart(outputs, inputs, replaces=False)


def check_rows_per_worker(cfg: TrainJobConfig, data: TrainData) -> None:
    """Every worker needs rows of both splits; known before Ray starts."""
    n = cfg.scaling.num_workers
    val = data.val_rows if data.val_rows is not None else int(data.train_rows * cfg.data.val_fraction)
    problems = []
    if data.train_rows - (0 if data.val_rows is not None else val) < n:
        problems.append(f"data.train_path has {data.train_rows} rows for scaling.num_workers={n}: "
                        "every worker needs at least one; lower scaling.num_workers or add rows")
    if val < n:
        where = ("data.val_path has" if data.val_rows is not None else
                 f"data.val_fraction={cfg.data.val_fraction} holds out about")
        problems.append(f"{where} {val} validation rows for scaling.num_workers={n}: every "
                        "worker needs at least one; lower scaling.num_workers, add validation "
                        "rows or raise data.val_fraction")
    collect(problems, DataError, "the data")


def check_shared_paths(cfg: TrainJobConfig, num_nodes: int) -> list[str]:
    """One warning per local path when the job spans several nodes (`cfg.tracking.tracking_uri`
    already resolved).

    Ray Data reads and checkpoints run on other nodes, and a local MLflow store is invisible
    there; a local path only works if every node mounts it at the same place (NFS), so this warns
    instead of failing.
    """
    from pipeline.storage import is_uri

    if num_nodes <= 1:
        return []
    named = [("data.train_path", cfg.data.train_path), ("data.val_path", cfg.data.val_path),
             ("train.storage_path", cfg.train.storage_path)]
    local = [(name, p) for name, value in named if value is not None
             for p in ([value] if isinstance(value, str) else value) if not is_uri(p)]
    uri = cfg.tracking.tracking_uri or tracking.DEFAULT_TRACKING_URI
    if tracking.is_local_store(uri):
        local.append(("tracking.tracking_uri", uri))
    if cfg.tracking.artifact_location and not is_uri(cfg.tracking.artifact_location):
        local.append(("tracking.artifact_location", cfg.tracking.artifact_location))
    return [f"{name}={path} is local to one machine but this Ray cluster has {num_nodes} nodes: use "
            "a shared URI (s3://, gs://, an mlflow server's http://) or an NFS mount present on "
            "every node" for name, path in local]


def _explain_failure(exc: BaseException) -> str:
    """Our own user-facing error inside Ray's wrappers, else a summary of the worker's error."""
    error = user_error_in(exc)
    if error is not None:
        return error.message
    return f"training failed on a worker ({first_line(exc)}); see the Ray worker logs"


def _print_progress(queue, epochs: int, console: Callable[[str], None], stop: threading.Event,
                    patience: int | None) -> None:
    while not stop.is_set():
        try:
            m = queue.get(timeout=0.5)
        except Exception:
            continue
        done = m["epoch"]
        eta = m["epoch_seconds"] * (epochs - done)
        console(f"epoch {done}/{epochs}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  "
                + (f"val_acc {m['val_accuracy']:.4f}  " if "val_accuracy" in m else
                   f"val_rmse {m['val_rmse']:.4f}  val_r2 {m['val_r2']:.4f}  ")
                + f"{m['sequences_per_second']:.0f} seq/s  "
                f"{m['epoch_seconds']:.1f}s  ETA {eta:.0f}s")
        if m.get("early_stopped"):
            console(f"early stopping: no better validation metric for {patience} epochs")


def _shard_rows(data: TrainData, cfg: TrainJobConfig) -> dict[str, int]:
    """About how many training and validation rows each worker's shard holds."""
    n = cfg.scaling.num_workers
    if data.val_rows is not None:
        train, val = data.train_rows, data.val_rows
    else:
        val = int(data.train_rows * cfg.data.val_fraction)
        train = data.train_rows - val
    return {"train": -(-train // n), "val": -(-val // n)}


def run_name_of(mlc, run_id: str) -> str:
    return mlc.get_run(run_id).info.run_name


def _dataset_schema(cfg: TrainJobConfig):
    """The shard columns training reads, as the MLflow schema shown with the dataset inputs."""
    from mlflow.types.schema import Array, ColSpec, Schema

    label_type = "long" if getattr(cfg.model, "task", "classification") == "classification" else "double"
    return Schema([ColSpec(Array(Array("double")), cfg.data.features_column),
                   ColSpec(label_type, cfg.data.label_column)])


def _input_example(data: TrainData, cfg: TrainJobConfig):
    """Two real validation (or training) sequences as the model's input example."""
    import pandas as pd

    from pipeline.data import open_parquet

    files = data.val_files or data.train_files
    batch = next(open_parquet(files[0]).iter_batches(batch_size=2, columns=[cfg.data.features_column]))
    return pd.DataFrame({cfg.data.features_column: batch.column(0).to_pylist()})


def prepared_facts(cfg: TrainJobConfig) -> dict[str, Any]:
    """What `data prepare` / `data uea` recorded in the training shards ({} for other shards);
    fails early, with the fix, when the dataset's task is not model.task."""
    from pipeline.data import list_shards
    from pipeline.errors import DataError
    from pipeline.prepare import dataset_facts

    try:
        facts = dataset_facts(list_shards(cfg.data.train_path, "data.train_path")[:1]) or {}
    except DataError:
        return {}  # validate_train_data reports it with the other data problems
    if facts.get("task") and facts["task"] != cfg.model.task:
        raise PipelineError(f"data.train_path holds a {facts['task']} dataset (made by `data "
                            f"prepare`) but model.task is {cfg.model.task}: set "
                            f"model.task={facts['task']}")
    return facts


def dataset_class_names(cfg: TrainJobConfig, data: TrainData, facts: dict[str, Any]) -> list[str] | None:
    """data.class_names, else the names `data prepare` stored in the shards."""
    names = cfg.data.class_names
    if names is None and cfg.model.task == "classification" and facts.get("class_names"):
        names = list(facts["class_names"])
        if len(names) < data.num_classes:
            raise PipelineError(f"the dataset names {len(names)} classes but its labels go up to "
                                f"{data.num_classes - 1}: set data.class_names or redo `data prepare`")
        if cfg.data.num_classes is None:
            data.num_classes = len(names)  # a class seen only in validation still gets its index
    return names


def run_training(cfg: TrainJobConfig, *, config_text: str | None = None,
                 command: str | None = None, config_path: str | None = None,
                 resume_run_id: str | None = None,
                 console: Callable[[str], None] = print) -> TrainResult:
    """Validate, train on Ray, track in MLflow. Raises PipelineError for anything the user can fix.

    With `resume_run_id`, the MLflow run is reopened and training continues from its latest
    checkpoint to `train.epochs`, logging into the same run.
    """
    import mlflow
    import ray

    cfg = _absolute_paths(cfg)
    check_outputs(cfg)
    regression = cfg.model.task == "regression"
    facts = prepared_facts(cfg)
    data = validate_train_data(cfg.data, regression=regression)
    check_rows_per_worker(cfg, data)
    class_names = dataset_class_names(cfg, data, facts)
    console(f"data: {data.train_rows} training rows in {len(data.train_files)} files, "
            f"{'%d validation rows' % data.val_rows if data.val_rows is not None else 'validation split %.0f%%' % (100 * cfg.data.val_fraction)}, "
            f"{data.n_features} features, "
            + (f"{data.num_outputs} regression output(s)" if regression else
               f"{data.num_classes} classes" + (f" ({', '.join(class_names)})" if class_names else "")))
    uri, mlc, exp_id = tracking.open_experiment(
        cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    meta = {
        "n_features": data.n_features,
        "num_classes": None if regression else data.num_classes,
        "class_names": class_names,
        "features_column": cfg.data.features_column,
        "model": to_dict(cfg.model),
        "normalization": None,  # filled from the training split in _fit when data.normalize
        "task": cfg.model.task,
        "num_outputs": data.num_outputs,
        "target_normalization": None,
    }
    resume_from = None
    if resume_run_id is not None:
        # Everything a resume could refuse is checked before the run is reopened.
        point = resume_point(cfg, resume_run_id)
        check_resume(cfg, point, meta, resume_run_id)
        resume_from = point.restore_from
        saved = point.state.get("meta", {})
        meta["normalization"] = saved.get("normalization")  # the model's own statistics
        meta["target_normalization"] = saved.get("target_normalization")
        exp_id = mlc.get_run(resume_run_id).info.experiment_id
    task = getattr(cfg.model, "task", "classification")
    run_name = cfg.tracking.run_name or (
        f"{task}-lstm-h{cfg.model.hidden_size}x{cfg.model.num_layers}"
        f"{'-bi' if cfg.model.bidirectional else ''}-{dt.datetime.now():%Y%m%d-%H%M%S}")
    device = "cuda" if cfg.scaling.use_gpu else "cpu"
    tags = {
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "num_workers": str(cfg.scaling.num_workers),
        "device": device,
        "train_path": ",".join(data.train_files[:20]),
        "train_rows": str(data.train_rows),
        "val_path": ",".join((data.val_files or ["(split from train)"])[:20]),
        "val_rows": str(data.val_rows if data.val_rows is not None else "split"),
    }
    if resume_run_id is None:
        tags["mlflow.note.content"] = report.description(command, config_path,
                                                         config_text or dump_yaml(cfg))
    tags |= report.source_tags("train")
    if resume_run_id is not None:
        tags["resumed_with"] = command or "run_training(resume_run_id=...)"
    with tracking.tracked_run(mlc, exp_id, run_name, tags, resume_run_id) as run_id:
        console(f"mlflow: run {run_id} in experiment {cfg.tracking.experiment!r} at {redact(uri)}"
                + (" (resumed)" if resume_run_id else ""))
        if resume_run_id is None:
            tracking.log_params(mlc, run_id, flatten(to_dict(cfg)) | {
                "data.n_features": data.n_features, "data.num_classes_resolved": data.num_classes})
            mlc.log_text(run_id, redact(config_text or dump_yaml(cfg)), "config.yaml")
            digests = report.log_datasets(
                mlc, run_id, [("train", data.train_files, data.train_rows)]
                + ([("validation", data.val_files, data.val_rows)] if data.val_files else []),
                _dataset_schema(cfg))
            mlc.set_tag(run_id, "data_digest", digests["train"])
        else:
            # Params are immutable in MLflow; the config a resume ran with is its own artifact.
            mlc.log_text(run_id, redact(config_text or dump_yaml(cfg)),
                         f"config-resume-{int(time.time())}.yaml")
        need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
        with ray_connection(cfg.scaling.address, need,
                            cfg.scaling.num_workers if cfg.scaling.use_gpu else 0,
                            f"{cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker} CPUs",
                            "lower scaling.num_workers / scaling.cpus_per_worker or add nodes",
                            cfg.scaling.local_num_cpus):
            resolved = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, tracking_uri=uri))
            for warning in check_shared_paths(resolved, sum(n["Alive"] for n in ray.nodes())):
                console(f"WARNING: {redact(warning)}")
            result = _fit(cfg, data, meta, run_id, uri, console, resume_from)
        best_ckpt, best_metrics = min(result.best_checkpoints or [(result.checkpoint, result.metrics)],
                                      key=lambda cm: cm[1]["val_loss"])
        with best_ckpt.as_directory() as path:
            state = torch.load(os.path.join(path, CHECKPOINT_FILE), map_location="cpu",
                               weights_only=True)
        for key in [k for k in ("val_loss", "val_accuracy", "val_mae", "val_rmse", "val_r2")
                    if k in best_metrics]:
            mlc.log_metric(run_id, f"best_{key}", best_metrics[key])
        mlc.set_tag(run_id, "checkpoint", best_ckpt.path)
        report.log_learning_curves(mlc, run_id)
        if state.get("val_confusion") is not None:
            report.log_confusion(mlc, run_id, state["val_confusion"].numpy(), meta.get("class_names"),
                                 title=f"validation, epoch {best_metrics['epoch']}: ")
        model_uri = tracking.log_model(run_id, uri, state["model"], meta, _input_example(data, cfg))
        version = None
        if cfg.tracking.registered_model_name:
            version = tracking.register_model(
                mlc, model_uri, run_id, cfg.tracking.registered_model_name,
                cfg.tracking.alias,
                description=(f"LSTM {task} from run {run_id} ({run_name_of(mlc, run_id)}): "
                             f"{report.result_summary(best_metrics)} at epoch {best_metrics['epoch']} "
                             f"of {cfg.train.epochs}; trained on {data.train_rows} sequences"),
                tags={"run_id": run_id, "checkpoint": best_ckpt.path,
                      "data_digest": mlc.get_run(run_id).data.tags.get("data_digest", ""),
                      "task": task},
            )
        return TrainResult(
            run_id=run_id, experiment_id=exp_id, tracking_uri=uri, model_uri=model_uri,
            registered_name=cfg.tracking.registered_model_name, version=version,
            val_accuracy=float(best_metrics.get("val_accuracy", "nan")),
            val_loss=float(best_metrics["val_loss"]),
            checkpoint_path=best_ckpt.path,
            val_metrics={k: float(v) for k, v in best_metrics.items()
                         if k.startswith("val_") and isinstance(v, (int, float))},
        )


def _fit(cfg: TrainJobConfig, data: TrainData, meta: dict[str, Any], run_id: str, uri: str,
         console: Callable[[str], None], resume_from: str | None = None):
    """Run the TorchTrainer, printing one line per epoch; returns Ray Train's Result."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    stop = threading.Event()
    train_ds, val_ds = make_datasets(data, cfg.data)
    if cfg.data.normalize and meta.get("normalization") is None:
        from pipeline import normalize

        meta["normalization"], target = normalize.compute(
            train_ds, cfg.data.features_column,
            cfg.data.label_column if meta.get("task") == "regression" else None, data.n_features)
        meta["target_normalization"] = target
        console(f"normalization: mean/std of {len(meta['normalization']['mean'])} features over "
                f"{meta['normalization']['count']} training steps"
                + (f"; targets mean {target['mean'][0]:.4g} std {target['std'][0]:.4g}" if target else ""))
    progress = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "meta": meta, "run_id": run_id, "tracking_uri": uri,
                           "progress": progress, "resume_from": resume_from,
                           "shard_rows": _shard_rows(data, cfg)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}
            | ({"GPU": 1} if cfg.scaling.use_gpu else {}),
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_dir_name(cfg, run_id),
            storage_path=cfg.train.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg.scaling.reuse_memory)},
        ),
        datasets={"train": train_ds, "val": val_ds},
    )
    printer = threading.Thread(target=_print_progress, daemon=True,
                               args=(progress, cfg.train.epochs, console, stop,
                                     cfg.train.early_stopping_patience))
    printer.start()
    try:
        with fit_interruptible():
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(_explain_failure(exc)) from None
    finally:
        time.sleep(0.6)  # let the last epoch line print
        stop.set()
        printer.join()
    return result
