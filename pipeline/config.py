"""Typed job configuration: one dataclass per concern, a docstring per field, value checks that
name the dotted key. Loaded from YAML plus dotted `key=value` overrides by pipeline/loader.py:

    cfg = load_config(TrainJobConfig, "conf/train.yaml", ["model.hidden_size=128"])

Only these dataclasses cross process boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.errors import ConfigError, collect

# The loading API, importable from here: cfg = load_config(TrainJobConfig, path, overrides)
from pipeline.loader import dump_yaml, flatten, load_config, to_dict  # noqa: F401

PathList = str | list[str]


def _empty_path(key: str, value: PathList | None, nullable: bool = False,
                what: str = "a directory, glob, file or URI") -> list[str]:
    """An empty string where a path belongs would silently mean the working directory."""
    items = [value] if isinstance(value, str) else (value or [])
    if (isinstance(value, list) and not value) or any(not p.strip() for p in items):
        return [f"{key} is empty: give {what}" + (" (or null)" if nullable else "")]
    return []


@dataclass
class DataConfig:
    train_path: PathList = "data/synth/train"
    """Training shards: a directory, a glob, a file, or a list of those (local path or URI)."""
    val_path: PathList | None = "data/synth/val"
    """Validation shards, same forms. When null, `val_fraction` of the training rows is held out."""
    val_fraction: float = 0.0
    """Fraction of training rows held out for validation when `val_path` is null (0 < f < 1)."""
    features_column: str = "features"
    """Column of `list<list<float>>` (time-major, [length, n_features]) per row."""
    parquet_reader: Literal["v1", "v2"] = "v1"
    """Ray Data's Parquet datasource. v1 (default): one read task per file, file metadata read
    where the plan is built. v2 (Ray 2.60's default): every read starts with a listing step that
    launches 32 footer-reader actors, i.e. 32 new worker processes per pass (per epoch, for a
    shard too large to cache); on a 2-core machine that cost 2-5 s a pass. v2 pays off for
    thousands of files on object storage."""
    label_column: str = "label"
    """Integer class index in [0, num_classes)."""
    id_column: str | None = "id"
    """Optional id column carried to predictions; ignored when absent."""
    num_classes: int | None = None
    """Number of classes; inferred from the training labels when null."""
    class_names: list[str] | None = None
    """Optional names for the classes, index-aligned; stored with the model."""
    batch_size: int = 128
    """Sequences per batch on each worker."""
    bucket_window: int = 8
    """Length bucketing: each worker takes windows of `bucket_window x batch_size` consecutive
    rows, orders each window by sequence length, cuts it into batches and shuffles their order
    (seeded by train.seed and the epoch; the same order on every worker). Batches then hold rows
    of similar length and pad to less: on skewed lengths (10..400 steps, 90% at most 50) an epoch
    took 4.0 s instead of 14.9 s (benchmarks/README.md). Rows stay in their window and every row
    is seen once per epoch; windows whose rows all have one length (fixed-length data) are left
    in order, so such data trains exactly as without bucketing. Validation batches are bucketed
    the same way (its sums do not depend on the order). 0 or 1 turns it off."""
    cache_mb: int = 128
    """Per worker: a training (or validation) shard of at most this many MiB (Arrow bytes) is
    streamed in the first epoch and replayed from the worker's memory afterwards, skipping Ray
    Data's per-epoch start-up; the batches are the same. Larger shards stream every epoch with
    flat memory. 0 streams always."""
    sample_rows: int = 2048
    """Rows per file checked up front (values); schemas and metadata of every file are always checked."""
    seed: int = 0
    """Seed for the validation split."""
    normalize: bool = True
    """Standardize each feature with the mean and standard deviation of the training split
    (one streaming pass before training); the statistics are stored with the model, so batch
    predict and the pyfunc model apply the same. Regression targets are standardized the same
    way for the loss; predictions come back in the target's units."""

    def __post_init__(self) -> None:
        problems = _empty_path("data.train_path", self.train_path)
        problems += _empty_path("data.val_path", self.val_path, nullable=True)
        if self.val_path is None and not 0.0 < self.val_fraction < 1.0:
            problems.append(
                "data.val_fraction must be between 0 and 1 (exclusive) when data.val_path is null"
            )
        if self.val_path is not None and self.val_fraction:
            problems.append("set either data.val_path or data.val_fraction, not both")
        if self.batch_size < 1:
            problems.append("data.batch_size must be >= 1")
        if self.cache_mb < 0:
            problems.append("data.cache_mb must be >= 0 (0: stream every epoch)")
        if self.bucket_window < 0:
            problems.append("data.bucket_window must be >= 0 (0 or 1: no length bucketing)")
        if self.num_classes is not None and self.num_classes < 2:
            problems.append("data.num_classes must be >= 2")
        if self.class_names is not None and self.num_classes not in (None, len(self.class_names)):
            problems.append("data.class_names must have data.num_classes entries")
        if self.sample_rows < 1:
            problems.append("data.sample_rows must be >= 1")
        collect(problems, ConfigError)


@dataclass
class ModelConfig:
    hidden_size: int = 64
    """LSTM hidden units per direction."""
    num_layers: int = 1
    """Stacked LSTM layers."""
    dropout: float = 0.0
    """Dropout between LSTM layers and before the output layer."""
    bidirectional: bool = False
    """Run a second LSTM backwards over each sequence and concatenate both summaries."""
    task: Literal["classification", "regression"] = "classification"
    """classification: integer class labels, softmax head, cross-entropy. regression: float
    labels (a number, or a list of numbers per row for multi-step forecasts) and a linear head
    with one output per number; loss train.loss; metrics MAE, RMSE and R^2."""

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size < 1:
            problems.append("model.hidden_size must be >= 1")
        if self.num_layers < 1:
            problems.append("model.num_layers must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("model.dropout must be in [0, 1)")
        collect(problems, ConfigError)


@dataclass
class OptimConfig:
    epochs: int = 6
    """Passes over the training data."""
    lr: float = 5e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; null disables clipping."""
    log_every_n_steps: int = 20
    """Log the training loss to MLflow every N optimizer steps (rank 0)."""
    seed: int = 0
    """Seed for weight initialisation and dropout."""
    storage_path: str = "ray_results"
    """Where Ray Train writes checkpoints: a local directory (made absolute) or a URI."""
    checkpoints_to_keep: int = 2
    """Checkpoints kept on storage: the best K by validation loss, plus always the latest."""
    checkpoint_every: int = 1
    """Save a checkpoint every this many epochs; one is also saved after the last epoch and
    whenever the validation loss improves (the model that is logged is the best one). A restart
    after a failure repeats at most checkpoint_every - 1 epochs."""
    deterministic: bool = False
    """Ask PyTorch for deterministic kernels (torch.use_deterministic_algorithms, cuDNN's
    deterministic mode): GPU runs repeat bit for bit where PyTorch can, at some speed. CPU runs
    repeat without it (same config, seed and number of workers)."""
    max_failures: int = 1
    """Times Ray Train restarts the worker group from the latest checkpoint after a failure
    (a dead worker, a preempted node); -1 retries forever."""
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    """Per-epoch learning-rate schedule: constant, cosine annealing to 0, or step decay."""
    lr_step_epochs: int = 10
    """With lr_schedule=step: multiply the rate by lr_gamma every this many epochs."""
    lr_gamma: float = 0.1
    """With lr_schedule=step: the decay factor."""
    early_stopping_patience: int | None = None
    """Stop after this many epochs without a better early_stopping_metric; null disables."""
    early_stopping_metric: Literal["val_loss", "val_accuracy", "val_rmse", "val_mae"] = "val_loss"
    """The validation metric early stopping watches (higher accuracy, lower others is better);
    val_accuracy for classification, val_rmse / val_mae for regression."""
    loss: Literal["mse", "huber"] = "mse"
    """Regression loss on standardized targets: mean squared error or Huber (robust to outliers).
    Classification always uses cross-entropy."""
    huber_delta: float = 1.0
    """With loss=huber: where the loss turns from quadratic to linear, in target standard
    deviations."""

    def __post_init__(self) -> None:
        problems = _empty_path("train.storage_path", self.storage_path, what="a directory or URI")
        if self.epochs < 1:
            problems.append("train.epochs must be >= 1")
        if self.lr <= 0:
            problems.append("train.lr must be > 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            problems.append("train.grad_clip must be > 0 or null")
        if self.log_every_n_steps < 1:
            problems.append("train.log_every_n_steps must be >= 1")
        if self.checkpoints_to_keep < 1:
            problems.append("train.checkpoints_to_keep must be >= 1")
        if self.checkpoint_every < 1:
            problems.append("train.checkpoint_every must be >= 1 (epochs)")
        if self.max_failures < -1:
            problems.append("train.max_failures must be >= 0 (or -1 for unlimited)")
        if self.lr_step_epochs < 1 or not 0 < self.lr_gamma <= 1:
            problems.append("train.lr_step_epochs must be >= 1 and train.lr_gamma in (0, 1]")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            problems.append("train.early_stopping_patience must be >= 1 or null")
        collect(problems, ConfigError)


@dataclass
class ScalingConfig:
    num_workers: int = 2
    """Training workers (DDP processes)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL backend. CPU training uses gloo."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker; also the worker's torch thread count."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places workers on nodes."""
    address: str | None = None
    """Ray cluster address; null uses RAY_ADDRESS, else starts a local Ray."""
    local_num_cpus: int | None = None
    """Logical CPUs for a local Ray; null = enough for the workers plus the data pipeline."""
    reuse_memory: bool = True
    """Workers keep freed memory for reuse instead of returning it to the OS after every step
    (glibc tunables; see pipeline/runtime.py): a quarter less time per CPU training step."""

    def __post_init__(self) -> None:
        problems = []
        if self.num_workers < 1:
            problems.append("scaling.num_workers must be >= 1")
        if self.cpus_per_worker < 1:
            problems.append("scaling.cpus_per_worker must be >= 1")
        collect(problems, ConfigError)


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None
    """MLflow tracking URI; null uses MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here."""
    experiment: str = "lstm-pipeline"
    """MLflow experiment for the runs."""
    run_name: str | None = None
    """Run name; null lets the pipeline name it."""
    artifact_location: str | None = None
    """Artifact root for a new experiment; null = ./mlartifacts for a local store, else the server's."""
    registered_model_name: str | None = "lstm-classifier"
    """Register the model under this name; null skips registration."""
    alias: str | None = "current"
    """Alias set on the new model version (`models:/NAME@current`). MLflow reserves `latest`."""
    system_metrics: bool = True
    """Log CPU, memory, disk, network (and GPU when present) of the rank-0 worker's node as
    `system/...` metrics (MLflow's system metrics monitor; training only)."""
    system_metrics_interval: float = 10.0
    """Seconds between system metric samples."""

    def __post_init__(self) -> None:
        problems = []
        if self.system_metrics_interval <= 0:
            problems.append("tracking.system_metrics_interval must be > 0 seconds")
        if self.alias is not None and self.alias.lower() == "latest":
            problems.append("tracking.alias 'latest' is reserved by MLflow (models:/NAME/latest "
                            "already means the newest version): choose another alias, e.g. current")
        else:
            problems += registry_name_problems(self.registered_model_name, self.alias)
        if self.tracking_uri is not None and not self.tracking_uri.strip():
            problems.append("tracking.tracking_uri is empty: give a URI or null (then "
                            "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
        collect(problems, ConfigError)


def registry_name_problems(name: str | None, alias: str | None) -> list[str]:
    """What MLflow's registry will refuse in a model name or alias, found with MLflow's own
    validation (before training, not after it): `/` and `:` in names, aliases that are not
    letters, digits, `_` and `-`, and the reserved `latest` and `v<N>`."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.utils import validation
    except ImportError:  # no MLflow here (a bare worker): the driver has checked
        return []
    checks = []
    if name is not None:
        checks.append(("tracking.registered_model_name", name, [validation._validate_model_name],
                       "choose a name without / or :, e.g. lstm-classifier"))
    if alias is not None:
        checks.append(("tracking.alias", alias, [validation._validate_model_alias_name,
                                                 validation._validate_model_alias_name_reserved],
                       "choose an alias of letters, digits, _ and - that is not latest or v<N>, "
                       "e.g. current or prod"))
    problems = []
    for key, value, validators, fix in checks:
        try:
            for validate in validators:
                validate(value)
        except MlflowException as exc:
            problems.append(f"{key} {value!r} is refused by MLflow ({exc.message}): {fix}")
    return problems


@dataclass
class TrainJobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        problems = []
        metric = self.train.early_stopping_metric
        if self.model.task == "regression" and metric == "val_accuracy":
            problems.append("train.early_stopping_metric val_accuracy needs model.task="
                            "classification: use val_loss, val_rmse or val_mae for regression")
        if self.model.task == "classification" and metric in ("val_rmse", "val_mae"):
            problems.append(f"train.early_stopping_metric {metric} needs model.task=regression: "
                            "use val_loss or val_accuracy for classification")
        if self.model.task == "regression" and (self.data.num_classes or self.data.class_names):
            problems.append("data.num_classes / data.class_names are for classification: drop them "
                            "or set model.task=classification")
        if self.train.huber_delta <= 0:
            problems.append("train.huber_delta must be > 0")
        collect(problems, ConfigError)


# --------------------------------------------------------------------------- batch prediction


@dataclass
class PredictConfig:
    model: str | None = None
    """Model to use: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a local model
    directory, or a bare registered NAME (its newest version)."""
    input_path: PathList | None = None
    """Shards to predict on (directory, glob, file or list; local or URI). `label` is optional."""
    output_path: str | None = None
    """Directory to create with the prediction shards (written whole or not at all)."""
    overwrite: bool = False
    """Replace an existing output directory."""
    passthrough_columns: list[str] | None = None
    """Input columns copied to the output; null = the id column when present (and the label)."""
    batch_size: int = 1024
    """Sequences per model call."""
    num_actors: int = 1
    """Model replicas (Ray actors), each loading the model once."""
    cpus_per_actor: int = 1
    """CPUs per actor; also its torch thread count."""
    use_gpu: bool = False
    """One GPU per actor."""
    reuse_memory: bool = True
    """Actors keep freed memory for reuse instead of returning it to the OS after every batch
    (glibc tunables; see pipeline/runtime.py)."""
    chunk_bytes: int = 1_000_000_000
    """Input is predicted in chunks of about this many Parquet bytes; a rerun after a crash
    skips the chunks already written."""
    max_failures: int = 1
    """Times a chunk is predicted again after a failure that is not the data's (an actor or node
    died). Ray Data's own actor restarts are off: they can fail when the actor's arguments were
    evicted from the object store (ray-project/ray#53727)."""

    def __post_init__(self) -> None:
        problems = []
        if self.input_path not in (None, ""):
            problems += _empty_path("predict.input_path (--input)", self.input_path)
        if self.output_path is not None and self.output_path and not self.output_path.strip():
            problems.append("predict.output_path (--output) is empty: give a directory to create")
        if self.batch_size < 1:
            problems.append("predict.batch_size must be >= 1")
        if self.chunk_bytes < 1:
            problems.append("predict.chunk_bytes must be >= 1")
        if self.max_failures < 0:
            problems.append("predict.max_failures must be >= 0")
        if self.num_actors < 1:
            problems.append("predict.num_actors must be >= 1")
        if self.cpus_per_actor < 1:
            problems.append("predict.cpus_per_actor must be >= 1")
        collect(problems, ConfigError)


@dataclass
class PredictDataConfig:
    features_column: str | None = None
    """Sequence column; null = the column the model was trained on."""
    label_column: str = "label"
    """Labels, when present, give accuracy, per-class precision/recall and a confusion matrix."""
    id_column: str = "id"
    """Passed through to the output when present."""
    parquet_reader: Literal["v1", "v2"] = "v1"
    """Ray Data's Parquet datasource, v1 or v2: see data.parquet_reader of the training config."""


@dataclass
class ClusterConfig:
    address: str | None = None
    """Ray cluster address; null uses RAY_ADDRESS, else starts a local Ray."""
    local_num_cpus: int | None = None
    """Logical CPUs for a local Ray; null = enough for the actors plus the read tasks."""


@dataclass
class PredictTrackingConfig:
    tracking_uri: str | None = None
    """MLflow tracking URI; null uses MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here."""
    experiment: str = "lstm-pipeline-predict"
    """MLflow experiment for prediction runs."""
    run_name: str | None = None
    """Run name; null lets the pipeline name it."""
    artifact_location: str | None = None
    """Artifact root for a new experiment; null = ./mlartifacts for a local store."""


@dataclass
class PredictJobConfig:
    predict: PredictConfig = field(default_factory=PredictConfig)
    data: PredictDataConfig = field(default_factory=PredictDataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: PredictTrackingConfig = field(default_factory=PredictTrackingConfig)
