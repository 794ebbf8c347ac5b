"""Training, driver side: validate everything, open the MLflow run, fit on Ray, log and register.

    cfg = load_config(TrainJobConfig, "conf/train.yaml", ["scaling.num_workers=2"])
    result = run_training(cfg)

Everything the user can get wrong is checked before Ray starts (config, outputs, data, MLflow,
resume), the run is opened before any cluster work (so every job has a run, even one that
fails), Ray Train's `TorchTrainer` runs `pipeline.worker.train_loop_per_worker` on every worker,
and the model of the best checkpoint is logged and registered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

import torch

from pipeline import report, tracking
from pipeline.checkpoints import (
    CHECKPOINT_FILE,
    check_resume,
    resume_point,
    run_dir_name,
)
from pipeline.cluster import ray_connection
from pipeline.config import TrainJobConfig, dump_yaml, flatten, to_dict
from pipeline.console import EpochLines, Timeline, explain_failure, fit_interruptible
from pipeline.data import make_datasets
from pipeline.errors import DataError, PipelineError, TrainingError, collect
from pipeline.model import ModelSpec
from pipeline.prepare import dataset_facts
from pipeline.redact import redact
from pipeline.remote import shared_path_warnings
from pipeline.runtime import worker_env
from pipeline.shards import TrainData, list_shards, open_parquet, validate_train_data
from pipeline.storage import absolute, check_apart, check_writable_dir
from pipeline.task import task_for
from pipeline.worker import WorkerArgs, train_loop_per_worker


@dataclass
class TrainResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    model_uri: str
    registered_name: str | None
    version: str | None
    alias: str | None
    val_accuracy: float
    val_loss: float
    checkpoint_path: str
    val_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    """The best checkpoint's validation metrics (val_loss, val_accuracy or val_mae/rmse/r2)."""
    summary: str = ""
    """The task's line for the best validation metrics (what the CLI prints)."""
    time_summary: str = ""
    """Where the run's wall time went (Timeline.summary)."""
    def summary_lines(self) -> list[str]:
        """What `lstm-pipeline train` prints at the end."""
        lines = [f"run id:          {self.run_id}"]
        if self.version:
            alias = f" (alias @{self.alias})" if self.alias else ""
            lines.append(f"registered:      models:/{self.registered_name}/{self.version}{alias}")
        lines += [f"model:           {self.model_uri}", self.summary,
                  f"time:            {self.time_summary}"]
        if self.tracking_uri.startswith("sqlite:"):
            default = tracking.resolve_tracking_uri(None)
            lines.append("open the UI:     lstm-pipeline ui" + (
                "" if self.tracking_uri == default else f" --tracking-uri {redact(self.tracking_uri)}"))
        else:
            lines.append(f"open the UI:     open {redact(self.tracking_uri)}")
        return lines


# --------------------------------------------------------------------------- before any work


def absolute_paths(cfg: TrainJobConfig) -> TrainJobConfig:
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
    """Checkpoints, artifacts and a local MLflow store go into directories that can be written
    and that are not the training or validation data."""
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
    """Every worker needs rows of both splits."""
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


def prepared_facts(cfg: TrainJobConfig) -> dict[str, Any]:
    """What `data prepare` / `data uea` recorded in the training shards ({} for other shards);
    fails early, with the fix, when the dataset's task is not model.task."""
    try:
        facts = dataset_facts(list_shards(cfg.data.train_path, "data.train_path")[:1]) or {}
    except DataError:
        return {}  # validate_train_data reports it with the other data problems
    if facts.get("task") and facts["task"] != cfg.model.task:
        raise PipelineError(f"data.train_path holds a {facts['task']} dataset (made by `data "
                            f"prepare`) but model.task is {cfg.model.task}: set "
                            f"model.task={facts['task']}")
    return facts


def model_spec(cfg: TrainJobConfig, data: TrainData, facts: dict[str, Any]) -> ModelSpec:
    """The network the config and the data call for. Class names: data.class_names, else the
    names `data prepare` stored in the shards (which also fix the number of classes, so a class
    seen only in validation still gets its index)."""
    regression = cfg.model.task == "regression"
    names = cfg.data.class_names
    num_classes = data.num_classes
    if names is None and not regression and facts.get("class_names"):
        names = list(facts["class_names"])
        if len(names) < data.num_classes:
            raise PipelineError(f"the dataset names {len(names)} classes but its labels go up to "
                                f"{data.num_classes - 1}: set data.class_names or redo `data prepare`")
        num_classes = cfg.data.num_classes or len(names)
    return ModelSpec(n_features=data.n_features,
                     num_outputs=data.num_outputs if regression else num_classes,
                     task=cfg.model.task, hidden_size=cfg.model.hidden_size,
                     num_layers=cfg.model.num_layers, dropout=cfg.model.dropout,
                     bidirectional=cfg.model.bidirectional, features_column=cfg.data.features_column,
                     class_names=tuple(names) if names else None)


def _data_line(cfg: TrainJobConfig, data: TrainData, spec: ModelSpec) -> str:
    val = (f"{data.val_rows} validation rows" if data.val_rows is not None
           else f"validation split {100 * cfg.data.val_fraction:.0f}%")
    what = (f"{spec.num_outputs} regression output(s)" if spec.regression else
            f"{spec.num_outputs} classes" + (f" ({', '.join(spec.class_names)})" if spec.class_names else ""))
    return (f"data: {data.train_rows} training rows in {len(data.train_files)} files, {val}, "
            f"{data.n_features} features, {what}")


# --------------------------------------------------------------------------- the run


def run_training(cfg: TrainJobConfig, *, config_text: str | None = None,
                 command: str | None = None, config_path: str | None = None,
                 resume_run_id: str | None = None,
                 console: Callable[[str], None] = print) -> TrainResult:
    """Validate, train on Ray, track in MLflow. Raises PipelineError for anything the user can fix.

    With `resume_run_id`, the MLflow run is reopened and training continues from its latest
    checkpoint to `train.epochs`, logging into the same run (checkpoints.NothingToDo when no
    epoch is left).
    """
    timeline = Timeline()
    with timeline.phase("data_checks"):
        cfg = absolute_paths(cfg)
        check_outputs(cfg)
        facts = prepared_facts(cfg)  # a dataset made for another task: that first, in one line
        data = validate_train_data(cfg.data, regression=cfg.model.task == "regression")
        check_rows_per_worker(cfg, data)
        spec = model_spec(cfg, data, facts)
    console(_data_line(cfg, data, spec))
    with timeline.phase("tracking"):
        uri, mlc, exp_id = tracking.open_experiment(
            cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    resume_from = None
    if resume_run_id is not None:
        # Everything a resume could refuse is checked before the run is reopened.
        point = resume_point(cfg, resume_run_id)
        check_resume(cfg, point, spec, resume_run_id)
        saved = ModelSpec.from_dict(point.state["meta"])  # the model's own statistics
        spec = spec.replace(normalization=saved.normalization,
                            target_normalization=saved.target_normalization)
        resume_from, exp_id = point.restore_from, mlc.get_run(resume_run_id).info.experiment_id
    config_text = config_text or dump_yaml(cfg)
    tags = _run_tags(cfg, data, command, config_path, config_text, resume_run_id)
    with tracking.tracked_run(mlc, exp_id, _run_name(cfg), tags, resume_run_id) as run_id:
        console(f"mlflow: run {run_id} in experiment {cfg.tracking.experiment!r} at {redact(uri)}"
                + (" (resumed)" if resume_run_id else ""))
        with timeline.phase("tracking"):
            _record_inputs(mlc, run_id, cfg, data, spec, config_text, resumed=resume_run_id is not None)
        with contextlib.ExitStack() as ray_session:
            with timeline.phase("ray_start"):
                need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
                ray_session.enter_context(ray_connection(
                    cfg.scaling.address, need, cfg.scaling.num_workers if cfg.scaling.use_gpu else 0,
                    f"{cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker} CPUs",
                    "lower scaling.num_workers / scaling.cpus_per_worker or add nodes",
                    cfg.scaling.local_num_cpus))
            _warn_unshared_paths(cfg, uri, console)
            train_ds, val_ds = make_datasets(data, cfg.data)
            # The workers compute the normalization statistics (pipeline.worker.with_statistics).
            args = WorkerArgs(cfg=cfg, spec=spec, run_id=run_id, tracking_uri=uri,
                              shard_rows=_shard_rows(data, cfg), resume_from=resume_from)
            result = fit(args, train_ds, val_ds, console, timeline)
            with timeline.phase("ray_stop"):
                ray_session.close()
        return _log_result(mlc, cfg, data, spec, result, uri, exp_id, run_id, timeline)


def _warn_unshared_paths(cfg: TrainJobConfig, uri: str, console) -> None:
    import ray

    resolved = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, tracking_uri=uri))
    for warning in shared_path_warnings(resolved, sum(n["Alive"] for n in ray.nodes())):
        console(f"WARNING: {redact(warning)}")


def _run_name(cfg: TrainJobConfig) -> str:
    return cfg.tracking.run_name or (
        f"{cfg.model.task}-lstm-h{cfg.model.hidden_size}x{cfg.model.num_layers}"
        f"{'-bi' if cfg.model.bidirectional else ''}-{dt.datetime.now():%Y%m%d-%H%M%S}")


def _run_tags(cfg: TrainJobConfig, data: TrainData, command: str | None, config_path: str | None,
              config_text: str, resume_run_id: str | None) -> dict[str, str]:
    import mlflow
    import ray

    tags = {
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        "num_workers": str(cfg.scaling.num_workers),
        "device": "cuda" if cfg.scaling.use_gpu else "cpu",
        "train_path": ",".join(data.train_files[:20]),
        "train_rows": str(data.train_rows),
        "val_path": ",".join((data.val_files or ["(split from train)"])[:20]),
        "val_rows": str(data.val_rows if data.val_rows is not None else "split"),
    } | report.source_tags("train")
    if resume_run_id is None:
        tags["mlflow.note.content"] = report.description(command, config_path, config_text)
    else:
        tags["resumed_with"] = command or "run_training(resume_run_id=...)"
    return tags


def _record_inputs(mlc, run_id: str, cfg: TrainJobConfig, data: TrainData, spec: ModelSpec,
                   config_text: str, resumed: bool) -> None:
    """Params, the config and the dataset inputs of a new run; the config of a resume."""
    if resumed:
        # Params are immutable in MLflow; the config a resume ran with is its own artifact.
        mlc.log_text(run_id, redact(config_text), f"config-resume-{int(time.time())}.yaml")
        return
    tracking.log_params(mlc, run_id, flatten(to_dict(cfg)) | {
        "data.n_features": data.n_features, "data.num_classes_resolved": data.num_classes})
    mlc.log_text(run_id, redact(config_text), "config.yaml")
    splits = [("train", data.train_files, data.train_rows)]
    if data.val_files:
        splits.append(("validation", data.val_files, data.val_rows))
    digests = report.log_datasets(mlc, run_id, splits, _dataset_schema(cfg, spec))
    mlc.set_tag(run_id, "data_digest", digests["train"])


HEALTH_CHECK_INTERVAL_S = "0.1"
"""How often Ray Train's controller polls the workers. A worker's report waits in a one-slot
queue until the controller's next poll (Ray's default: every 2 s), so a short epoch took 2 s of
wall time whatever its compute; polling ten times a second costs the controller little."""


def fit(args: WorkerArgs, train_ds, val_ds, console: Callable[[str], None],
        timeline: Timeline | None = None):
    """Run the TorchTrainer, printing one line per epoch; returns Ray Train's Result."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    cfg = args.cfg
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    # The same data order in every run of a config: blocks reach the workers in dataset order,
    # so the split across workers, and each worker's stream, do not depend on timing.
    ingest = ExecutionOptions(preserve_order=True)
    args.progress = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}
            | ({"GPU": 1} if cfg.scaling.use_gpu else {}),
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_dir_name(cfg, args.run_id),
            storage_path=cfg.train.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg.scaling.reuse_memory)
                                | (DETERMINISTIC_ENV if cfg.train.deterministic else {})},
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    lines = EpochLines(args.progress, cfg.train.epochs, task_for(args.spec), console,
                       cfg.train.early_stopping_patience)
    started = time.time()
    try:
        with lines.running(), fit_interruptible():
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(explain_failure(exc)) from None
    if timeline is not None and lines.first_started is not None:
        timeline.add("worker_start", lines.first_started - started - lines.statistics_s)
        timeline.add("statistics", lines.statistics_s)
        timeline.add("epochs", lines.last_reported - lines.first_started)
        timeline.add("worker_stop", time.time() - lines.last_reported)
    return result


DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
"""cuBLAS needs this before CUDA starts to run deterministically (train.deterministic)."""


# --------------------------------------------------------------------------- after training


def _log_result(mlc, cfg: TrainJobConfig, data: TrainData, spec: ModelSpec, result, uri: str,
                exp_id: str, run_id: str, timeline: Timeline) -> TrainResult:
    """From the best checkpoint (lowest val_loss): best metrics, learning curves, the confusion
    matrix, the logged model and its registered version."""
    best_ckpt, best = min(result.best_checkpoints or [(result.checkpoint, result.metrics)],
                          key=lambda cm: cm[1]["val_loss"])
    with best_ckpt.as_directory() as path:
        state = torch.load(os.path.join(path, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    spec = ModelSpec.from_dict(state["meta"])  # with the statistics the workers computed
    task = task_for(spec, cfg.train)
    for key in (k for k in task.metric_keys if k in best):
        mlc.log_metric(run_id, f"best_{key}", best[key])
    mlc.set_tag(run_id, "checkpoint", best_ckpt.path)
    report.log_learning_curves(mlc, run_id)
    if state.get("val_confusion") is not None:
        report.log_confusion(mlc, run_id, state["val_confusion"].numpy(),
                             list(spec.class_names) if spec.class_names else None,
                             title=f"validation, epoch {best['epoch']}: ")
    with timeline.phase("model_logging"):
        model_uri = tracking.log_model(run_id, uri, state["model"], spec, task.signature(),
                                       _input_example(data, cfg))
    version = None
    if cfg.tracking.registered_model_name:
        with timeline.phase("registration"):
            version = _register(mlc, cfg, data, spec, run_id, model_uri, best, best_ckpt.path)
    tracking.log_metrics(mlc, run_id, timeline.metrics())
    val = {k: float(v) for k, v in best.items() if k.startswith("val_") and isinstance(v, (int, float))}
    return TrainResult(
        run_id=run_id, experiment_id=exp_id, tracking_uri=uri, model_uri=model_uri,
        registered_name=cfg.tracking.registered_model_name, version=version,
        alias=cfg.tracking.alias, val_accuracy=float(best.get("val_accuracy", "nan")),
        val_loss=float(best["val_loss"]), checkpoint_path=best_ckpt.path, val_metrics=val,
        summary=task.summary(val), time_summary=timeline.summary())


def _register(mlc, cfg: TrainJobConfig, data: TrainData, spec: ModelSpec, run_id: str,
              model_uri: str, best: dict, checkpoint: str) -> str:
    return tracking.register_model(
        mlc, model_uri, run_id, cfg.tracking.registered_model_name, cfg.tracking.alias,
        description=(f"LSTM {spec.task} from run {run_id} ({mlc.get_run(run_id).info.run_name}): "
                     f"{report.result_summary(best)} at epoch {best['epoch']} "
                     f"of {cfg.train.epochs}; trained on {data.train_rows} sequences"),
        tags={"run_id": run_id, "checkpoint": checkpoint,
              "data_digest": mlc.get_run(run_id).data.tags.get("data_digest", ""),
              "task": spec.task},
    )


def _shard_rows(data: TrainData, cfg: TrainJobConfig) -> dict[str, int]:
    """About how many training and validation rows each worker's shard holds."""
    n = cfg.scaling.num_workers
    if data.val_rows is not None:
        train, val = data.train_rows, data.val_rows
    else:
        val = int(data.train_rows * cfg.data.val_fraction)
        train = data.train_rows - val
    return {"train": -(-train // n), "val": -(-val // n)}


def _dataset_schema(cfg: TrainJobConfig, spec: ModelSpec):
    """The shard columns training reads, as the MLflow schema shown with the dataset inputs."""
    from mlflow.types.schema import Array, ColSpec, Schema

    return Schema([ColSpec(Array(Array("double")), cfg.data.features_column),
                   ColSpec(task_for(spec).label_type, cfg.data.label_column)])


def _input_example(data: TrainData, cfg: TrainJobConfig):
    """Two real validation (or training) sequences as the model's input example."""
    import pandas as pd

    files = data.val_files or data.train_files
    batch = next(open_parquet(files[0]).iter_batches(batch_size=2, columns=[cfg.data.features_column]))
    return pd.DataFrame({cfg.data.features_column: batch.column(0).to_pylist()})
