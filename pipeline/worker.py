"""One DDP training worker: its shard of the data, the model, epochs of train / evaluate / report.

Ray Train runs `train_loop_per_worker` in every worker process; the driver (pipeline/train.py)
hands it a `WorkerArgs`. `train_epoch` is a plain function of a model and batches; evaluation is
the task's (pipeline/task.py). Rank 0 is the only one that talks to MLflow, writes checkpoints
and feeds the driver's console, all behind `Reporter`.

Restarts (a worker died, `--resume`) continue from the latest checkpoint: model, optimizer, LR
schedule, epoch, step, RNG states and early-stopping state. Metrics already in MLflow for the
steps and epochs being redone are kept and the redone values skipped, so the history has neither
gaps nor duplicates.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from pipeline import normalize, tracking
from pipeline.batching import ShardCache, window_rows
from pipeline.checkpoints import CHECKPOINT_FILE
from pipeline.config import TrainJobConfig, to_dict
from pipeline.data import SequenceCollate
from pipeline.errors import NonFiniteLoss, TrainingError
from pipeline.model import ModelSpec, Moments, build_model
from pipeline.redact import redact
from pipeline.runtime import allocator_in_use
from pipeline.task import task_for


@dataclass
class WorkerArgs:
    """What every worker gets from the driver: typed config only."""

    cfg: TrainJobConfig
    spec: ModelSpec
    run_id: str
    tracking_uri: str
    shard_rows: dict[str, int]
    """About how many training ("train") and validation ("val") rows each worker's shard holds."""
    resume_from: str | None = None
    """A checkpoint directory to start from when Ray Train has none (see checkpoints.py)."""
    progress: Any = None
    """A ray.util.queue.Queue: rank 0 puts each epoch's metrics there for the driver's console."""


@dataclass
class Progress:
    """Where training stands: saved in every checkpoint, restored on a restart."""

    epoch: int = 0
    """The next epoch to train (0-based)."""
    step: int = 0
    best: float | None = None
    """The best value of train.early_stopping_metric so far."""
    stale: int = 0
    """Epochs since it last improved."""
    best_val_loss: float | None = None
    """The lowest validation loss so far: a checkpoint is saved whenever it improves."""

    def update(self, metric: str, metrics: dict[str, float]) -> bool:
        """Take one epoch's metrics; returns whether the validation loss improved."""
        value = metrics[metric]
        better = self.best is None or (value > self.best if metric == "val_accuracy" else value < self.best)
        self.best, self.stale = (value, 0) if better else (self.best, self.stale + 1)
        improved = self.best_val_loss is None or metrics["val_loss"] < self.best_val_loss
        if improved:
            self.best_val_loss = metrics["val_loss"]
        return improved


# --------------------------------------------------------------------------- steps


def train_epoch(model, optimizer, batches: Iterable[dict], device, grad_clip: float | None,
                on_step: Callable[[int, float], None], step: int, epoch: int,
                timing: dict[str, float] | None = None,
                loss_fn: Callable | None = None) -> tuple[float, int, int]:
    """One pass over `batches`; returns (summed loss, sequences seen, global step).
    `loss_fn(output, label)` defaults to cross-entropy (the task's loss in training).

    `timing`, when given, receives "data_wait" (seconds spent waiting for the next batch) and
    "total" (seconds for the whole pass): two clock reads per step, no device sync.
    """
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
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
        loss = loss_fn(model(x, batch["lengths"]), y)
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


def all_reduce_sum(values: torch.Tensor, device) -> torch.Tensor:
    """Add a float64 vector across the workers (one collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out = values.to(device)
    dist.all_reduce(out)
    return out.cpu()


def make_scheduler(optimizer, cfg: TrainJobConfig):
    if cfg.train.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    if cfg.train.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.train.lr_step_epochs, cfg.train.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


# --------------------------------------------------------------------------- state


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


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


def save_state(directory: str, *, model, optimizer, scheduler, progress: Progress,
               args: WorkerArgs, spec: ModelSpec, val_confusion: torch.Tensor | None) -> None:
    """checkpoint.pt: everything a restart needs, in types `torch.load(weights_only=True)` reads."""
    torch.save({
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": progress.epoch - 1,  # the last finished epoch
        "step": progress.step,
        "best": progress.best,
        "stale": progress.stale,
        "best_val_loss": progress.best_val_loss,
        "rng": _rng_state(),
        "config": to_dict(args.cfg),
        "run_id": args.run_id,
        "meta": spec.to_dict(),
        # The validation confusion matrix of this epoch [true, predicted]: the driver logs the
        # best checkpoint's as the run's confusion matrix and per-class table.
        "val_confusion": val_confusion,
    }, os.path.join(directory, CHECKPOINT_FILE))


def load_state(checkpoint) -> dict[str, Any] | None:
    """A Ray Train checkpoint's checkpoint.pt (None: no checkpoint)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        return torch.load(os.path.join(path, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def restore_state(state: dict[str, Any] | None, model, optimizer, scheduler) -> Progress:
    """Load a checkpoint's state into the model, optimizer and schedule; None: a fresh start."""
    if state is None:
        return Progress()
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return Progress(epoch=state["epoch"] + 1, step=state["step"], best=state["best"],
                    stale=state["stale"], best_val_loss=state.get("best_val_loss"))


# --------------------------------------------------------------------------- reporting


class Reporter:
    """What a worker tells the world. Rank 0 logs step and epoch metrics to MLflow, samples system
    metrics, saves the checkpoint and feeds the driver's console; every other rank only joins Ray
    Train's report (a collective: all ranks call it each epoch). Rank 0 connects to MLflow in a
    thread while the worker reads its shard and builds the model."""

    def __init__(self, args: WorkerArgs, rank: int):
        self.args, self.rank0 = args, rank == 0
        self.every = args.cfg.train.log_every_n_steps
        self._logger = self.monitor = None
        self._connecting = None
        if self.rank0:
            self._connecting = threading.Thread(target=self._connect, daemon=True)
            self._connecting.start()

    def _connect(self) -> None:
        args = self.args
        self._logger = tracking.MetricLogger(args.tracking_uri, args.run_id)
        self._logger.mlc.set_tag(args.run_id, "worker_allocator", allocator_in_use())
        if args.cfg.tracking.system_metrics:
            # A sampling thread on this node; it stops once the run is no longer RUNNING.
            self.monitor = tracking.system_metrics_monitor(
                args.tracking_uri, args.run_id, args.cfg.tracking.system_metrics_interval)

    @property
    def logger(self):
        if self._connecting is not None:
            self._connecting.join()
            self._connecting = None
            if self._logger is None:
                raise TrainingError(f"rank 0 could not connect to MLflow at "
                                    f"{redact(self.args.tracking_uri)}: see the worker's log")
        return self._logger

    def note(self, line: str, **extra) -> None:
        """A line for the driver's console (rank 0)."""
        if self.rank0 and self.args.progress is not None:
            self.args.progress.put_nowait({"note": line} | extra)

    def step(self, step: int, loss: float) -> None:
        if self.rank0 and step % self.every == 0:
            self.logger.log({"train_loss_step": loss}, step)

    def epoch(self, metrics: dict[str, float], save: Callable[[str], None] | None,
              started_at: float) -> None:
        """Log the epoch; with `save`, checkpoint it through Ray Train (a collective: every rank
        decides the same from the all-reduced metrics)."""
        import ray.train

        if self.rank0:
            self.logger.log({k: v for k, v in metrics.items()
                             if k not in ("epoch", "step", "early_stopped")}, int(metrics["epoch"]))
            self.logger.flush()
        if save is not None and self.rank0:
            with tempfile.TemporaryDirectory() as tmp:
                save(tmp)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif save is not None:
            ray.train.report(metrics, checkpoint=None)
        if self.rank0 and self.args.progress is not None:
            # Wall time of the whole epoch, checkpoint included: the console line and the ETA.
            self.args.progress.put_nowait(metrics | {"started_at": started_at,
                                                     "reported_at": time.time()})

    def close(self) -> None:
        if self.rank0:
            self.logger.flush(wait=True)
        if self.monitor is not None:
            self.monitor.finish()


# --------------------------------------------------------------------------- the loop


def _gather(obj) -> list:
    """Every worker's `obj`, in rank order (one worker: just its own)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def with_statistics(spec: ModelSpec, shard: ShardCache, cfg: TrainJobConfig,
                    reporter: Reporter) -> ModelSpec:
    """The spec with the training split's feature (and target) statistics, from one pass over
    every worker's shard (the pass that also fills the shard cache)."""
    start = time.perf_counter()
    features, target = normalize.shard_statistics(
        shard.iter_windows(window_rows(cfg.data.batch_size, cfg.data.bucket_window)),
        cfg.data.features_column, cfg.data.label_column if spec.regression else None,
        spec.n_features, _gather)
    if features is None:
        raise TrainingError("the training set is empty: give data.train_path more rows")
    reporter.note(f"normalization: mean/std of {len(features['mean'])} features over "
                  f"{features['count']} training steps"
                  + (f"; targets mean {target['mean'][0]:.4g} std {target['std'][0]:.4g}" if target else ""),
                  statistics_s=time.perf_counter() - start)
    return spec.replace(normalization=Moments.from_dict(features),
                        target_normalization=Moments.from_dict(target))


def _set_up(args: WorkerArgs, rank: int, reporter: Reporter):
    """This worker's shards, the model (from its checkpoint when there is one), the optimizer,
    the schedule, the task and where training stands."""
    import ray.train
    import ray.train.torch

    cfg = args.cfg
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and args.resume_from:
        checkpoint = ray.train.Checkpoint(args.resume_from)
    state = load_state(checkpoint)
    spec = ModelSpec.from_dict(state["meta"]) if state else args.spec
    # Shards that fit data.cache_mb are streamed once and then replayed from this worker's memory.
    shards = {split: ShardCache(ray.train.get_dataset_shard(split), cfg.data.cache_mb * 2**20,
                                args.shard_rows.get(split)) for split in ("train", "val")}
    if cfg.data.normalize and spec.normalization is None:
        spec = with_statistics(spec, shards["train"], cfg, reporter)
    # The model's buffers (normalization statistics) are constants: DDP's default broadcast of
    # them before every forward would be one more collective, i.e. one more wait, per step.
    model = ray.train.torch.prepare_model(build_model(spec),
                                          parallel_strategy_kwargs={"broadcast_buffers": False})
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    progress = restore_state(state, model, optimizer, scheduler)
    task = task_for(spec, cfg.train)
    collate = SequenceCollate(cfg.data.features_column, cfg.data.label_column, task, spec.n_features)
    batching = dict(collate=collate, batch_size=cfg.data.batch_size, window=cfg.data.bucket_window,
                    column=cfg.data.features_column, seed=cfg.train.seed, rank=rank)
    return spec, shards, model, optimizer, scheduler, progress, task, batching


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: its shard, the model, epochs of train/evaluate/report."""
    import ray.train
    import ray.train.torch

    args: WorkerArgs = config["args"]
    cfg, rank = args.cfg, ray.train.get_context().get_world_rank()
    # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker actually reserved.
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    device = ray.train.torch.get_device()
    reporter = Reporter(args, rank)
    spec, shards, model, optimizer, scheduler, progress, task, batching = _set_up(args, rank, reporter)
    for epoch in range(progress.epoch, cfg.train.epochs):
        t0, timing, started_at = time.perf_counter(), {}, time.time()
        loss_sum, seen, progress.step = train_epoch(
            model, optimizer, shards["train"].batches(epoch=epoch, **batching), device,
            cfg.train.grad_clip, reporter.step, progress.step, epoch, timing, loss_fn=task.loss)
        train_seconds = time.perf_counter() - t0
        # Bucketed too: evaluation sums do not depend on the order, and shorter padding is faster.
        sums = all_reduce_sum(torch.cat([torch.tensor([loss_sum, seen], dtype=torch.float64),
                                         task.eval_sums(model, shards["val"].batches(epoch=0, **batching),
                                                        device)]), device)
        if task.count(sums[2:]) == 0:
            raise TrainingError("the validation set is empty: give data.val_path more rows or "
                                "raise data.val_fraction")
        metrics = {"epoch": epoch + 1, "step": progress.step,
                   "train_loss": float(sums[0]) / max(float(sums[1]), 1.0), **task.metrics(sums[2:]),
                   "learning_rate": optimizer.param_groups[0]["lr"],
                   "sequences_per_second": float(sums[1]) / train_seconds,
                   "epoch_seconds": time.perf_counter() - t0,
                   # Rank 0's share of its training pass spent waiting for the next batch.
                   "data_wait_fraction": timing["data_wait"] / max(timing["total"], 1e-9)}
        scheduler.step()
        progress.epoch = epoch + 1
        improved = progress.update(cfg.train.early_stopping_metric, metrics)
        patience = cfg.train.early_stopping_patience
        stop = patience is not None and progress.stale >= patience and epoch + 1 < cfg.train.epochs
        metrics["early_stopped"] = int(stop)
        last = stop or epoch + 1 == cfg.train.epochs
        save = improved or last or (epoch + 1) % cfg.train.checkpoint_every == 0
        reporter.epoch(metrics, (lambda d: save_state(
            d, model=model, optimizer=optimizer, scheduler=scheduler, progress=progress, args=args,
            spec=spec, val_confusion=task.confusion(sums[2:]))) if save else None, started_at)
        if stop:
            break
    reporter.close()
