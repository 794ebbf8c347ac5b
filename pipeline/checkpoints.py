"""Where a run's checkpoints live, and what `train --resume` may continue.

    cfg, text = config_for_resume(run_id, ["train.epochs=20"])   # the run's config + overrides
    point = resume_point(cfg, run_id)                             # its newest complete checkpoint
    check_resume(cfg, point, meta, run_id)                        # before the run is touched

Ray Train writes one directory per MLflow run under `train.storage_path` (`run_dir_name`), and
restores from the newest checkpoint its snapshot names when a trainer with that name starts.
Everything `--resume` could refuse is checked here before the run is reopened, so a refused
resume leaves a FINISHED run FINISHED.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from typing import Any

from pipeline import tracking
from pipeline.config import TrainJobConfig, dump_yaml, flatten, load_config, to_dict
from pipeline.errors import PipelineError
from pipeline.model import ModelSpec
from pipeline.redact import redact
from pipeline.storage import filesystem

CHECKPOINT_FILE = "checkpoint.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"

# Config keys that define the model a checkpoint holds: a resume must keep them.
MODEL_KEYS = ("model.hidden_size", "model.num_layers", "model.dropout", "model.bidirectional",
              "model.task", "data.features_column", "data.normalize")


class NothingToDo(Exception):
    """`--resume` of a run that has no epoch left to train: nothing is changed."""


@dataclass
class ResumePoint:
    restore_from: str | None
    """None: Ray Train restores by itself from the run directory's snapshot. A path: the newest
    checkpoint that loads, for a crash that came after a checkpoint was written but before Ray
    recorded it in the snapshot (the controller writes it after the report)."""
    state: dict[str, Any]
    """The newest checkpoint's contents (epoch, early-stopping state, config, model metadata)."""


def run_dir_name(cfg: TrainJobConfig, run_id: str) -> str:
    """Ray Train's run directory under train.storage_path: one per MLflow run, so a restart or a
    `--resume` finds that run's checkpoints (Ray restores from the latest automatically)."""
    return f"{cfg.tracking.experiment}-{run_id[:12]}"


def config_for_resume(run_id: str, overrides: list[str]) -> tuple[TrainJobConfig, str]:
    """The config a run was trained with (its config.yaml artifact) plus new overrides."""
    import mlflow.exceptions

    probe = load_config(TrainJobConfig, None, overrides)
    uri = tracking.resolve_tracking_uri(probe.tracking.tracking_uri)
    tracking.check_reachable(uri)
    mlc = tracking.checked_client(uri)
    try:
        mlc.get_run(run_id)
        with tempfile.TemporaryDirectory() as tmp:
            path = mlc.download_artifacts(run_id, "config.yaml", tmp)
            cfg = load_config(TrainJobConfig, path, overrides)
    except mlflow.exceptions.MlflowException as exc:
        raise PipelineError(f"cannot resume run {run_id} from {redact(uri)} "
                            f"({redact(str(exc).splitlines()[0])}): give the id of a training "
                            "run in this tracking store") from None
    return cfg, dump_yaml(cfg)


def _load(fs, path: str) -> dict[str, Any]:
    import torch

    with fs.open_input_file(f"{path}/{CHECKPOINT_FILE}") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def _newest(fs, inner: str) -> tuple[str, dict] | None:
    """(directory, state) of the checkpoint with the highest epoch that loads completely."""
    import pyarrow.fs as pafs

    best = None
    for info in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            state = _load(fs, info.path)
        except Exception:  # noqa: BLE001  (absent or half-written: not a checkpoint to resume)
            continue
        if best is None or state["epoch"] > best[1]["epoch"]:
            best = (info.base_name, state)
    return best


def resume_point(cfg: TrainJobConfig, run_id: str) -> ResumePoint:
    """The newest complete checkpoint of the run, and whether Ray's snapshot knows it."""
    import pyarrow.fs as pafs

    path = f"{cfg.train.storage_path.rstrip('/')}/{run_dir_name(cfg, run_id)}"
    fs, inner = filesystem(path)
    newest = _newest(fs, inner)
    if newest is None:
        raise PipelineError(f"run {run_id} has no checkpoint under {path}: it stopped before its "
                            "first epoch ended, or train.storage_path differs; train it anew")
    snapshot = fs.get_file_info(f"{inner}/{SNAPSHOT_FILE}").type == pafs.FileType.File
    return ResumePoint(restore_from=None if snapshot else f"{path}/{newest[0]}", state=newest[1])


def resume_checkpoint(cfg: TrainJobConfig, run_id: str) -> str | None:
    """Where `--resume` continues from: None when Ray restores by itself (see ResumePoint)."""
    return resume_point(cfg, run_id).restore_from


def check_resume(cfg: TrainJobConfig, point: ResumePoint, spec, run_id: str) -> None:
    """Refuse, before the run is reopened, a resume that changes the model (`spec`: the one the
    new config and data call for) or the data's shape; raise NothingToDo when no epoch is left."""
    saved_cfg = flatten(point.state.get("config", {}))
    new_cfg = flatten(to_dict(cfg))
    problems = [f"{key} is {saved_cfg[key]!r} in run {run_id}'s checkpoint but {new_cfg[key]!r} "
                "now: --resume continues the same model; drop that override, or train a new run"
                for key in MODEL_KEYS if key in saved_cfg and saved_cfg[key] != new_cfg[key]]
    saved = ModelSpec.from_dict(point.state["meta"])
    what = "regression outputs" if saved.regression else "classes"
    for mine, theirs, name in ((spec.n_features, saved.n_features, "features per step"),
                               (spec.num_outputs, saved.num_outputs, what)):
        if mine != theirs and not problems:
            problems.append(f"the data has {mine} {name}, run {run_id}'s model {theirs}: --resume "
                            "needs data of the same shape; point data.train_path / data.val_path "
                            "at it, or train a new run")
    if problems:
        raise PipelineError(problems[0], problems)
    done = point.state["epoch"] + 1
    if done >= cfg.train.epochs:
        raise NothingToDo(f"run {run_id} has trained {done} of train.epochs={cfg.train.epochs} "
                          "epochs: nothing to do; pass a larger train.epochs to train on")
    patience = cfg.train.early_stopping_patience
    if patience is not None and point.state.get("stale", 0) >= patience:
        raise NothingToDo(f"run {run_id} stopped early after epoch {done} (no better "
                          f"{cfg.train.early_stopping_metric} for {point.state['stale']} epochs, "
                          f"train.early_stopping_patience={patience}): nothing to do; raise "
                          "train.early_stopping_patience (or set it to null) to train on")
