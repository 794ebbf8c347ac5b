"""What a run leaves for the MLflow UI: plots, tables, dataset inputs, provenance.

    metrics = log_confusion(mlc, run_id, matrix, class_names)   # PNG + JSON + per-class table
    log_learning_curves(mlc, run_id)                            # from the run's metric history
    log_datasets(mlc, run_id, [("train", files, rows)], schema)  # the UI's dataset column

Everything here runs on the driver, once per run, after (or before) the work it describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.redact import redact
from pipeline.storage import filesystem, is_uri

# --------------------------------------------------------------------------- provenance

REPO_ROOT = Path(__file__).resolve().parents[1]
GIT_COMMIT_ENV = "LSTM_PIPELINE_GIT_COMMIT"


def git_commit() -> str | None:
    """The project's git commit ("+dirty" when it has uncommitted changes), or None outside a
    checkout. A submitted job has no .git in its working_dir: `submit` passes the commit of the
    submitting checkout in LSTM_PIPELINE_GIT_COMMIT."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def source_tags(stage: str) -> dict[str, str]:
    """MLflow's system tags for the run page's Source / Created by fields, plus the git commit."""
    import getpass

    tags = {"mlflow.source.name": f"lstm-pipeline {stage}", "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (some containers)
        pass
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def description(command: str | None, config_path: str | None, config_text: str) -> str:
    """The run's description (MLflow note, Markdown): the exact command and the config it ran."""
    parts = []
    if command:
        parts.append(f"**Command**\n\n```\n{redact(command)}\n```")
    source = f"`{config_path}`" if config_path else "built-in defaults"
    parts.append(f"**Config** ({source} plus overrides, resolved)\n\n```yaml\n"
                 f"{redact(config_text.rstrip())}\n```")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- datasets


def data_digest(files: list[str]) -> str:
    """A fingerprint of the files a job read: paths, sizes and modification times (cheap; no data
    is read, so it works for any dataset size)."""
    h = hashlib.sha256()
    for path in sorted(files):
        fs, inner = filesystem(path)
        info = fs.get_file_info(inner)
        h.update(json.dumps([path, info.size, info.mtime_ns]).encode())
    return h.hexdigest()[:16]


def _dataset_class():
    from mlflow.data.meta_dataset import MetaDataset

    class ShardDataset(MetaDataset):
        """Metadata only (the shards stay where they are), plus a profile the UI shows."""

        def __init__(self, source, name, digest, schema, profile):
            self._profile = profile
            super().__init__(source=source, name=name, digest=digest, schema=schema)

        @property
        def profile(self):
            return self._profile

        def to_dict(self):
            return super().to_dict() | {"profile": json.dumps(self._profile)}

    return ShardDataset


def _root(files: list[str]) -> str:
    """The directory (or single file) a split's files share."""
    if len(files) == 1:
        return files[0]
    if is_uri(files[0]):
        return os.path.dirname(files[0])
    return os.path.commonpath(files)


def _source(root: str):
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    try:
        # "can be interpreted in multiple ways": MLflow registers the local source twice.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return resolve_dataset_source(root)
    except Exception:  # noqa: BLE001  (a URI scheme MLflow has no source type for)
        return HTTPDatasetSource(url=root)


def log_datasets(mlc, run_id: str, splits: list[tuple[str, list[str], int]], schema,
                 name: str | None = None) -> dict[str, str]:
    """Record each (context, files, rows) as an MLflow dataset input; returns context -> digest."""
    from mlflow.entities import DatasetInput, InputTag

    cls = _dataset_class()
    inputs, digests = [], {}
    for context, files, rows in splits:
        digest = data_digest(files)
        digests[context] = digest
        root = _root(files)
        ds = cls(_source(root), name or Path(root.rstrip("/")).name, digest, schema,
                 {"num_rows": rows, "num_files": len(files)})
        inputs.append(DatasetInput(ds._to_mlflow_entity(),
                                   tags=[InputTag("mlflow.data.context", context)]))
    mlc.log_inputs(run_id, datasets=inputs)
    return digests


# --------------------------------------------------------------------------- plots and tables


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def per_class_table(matrix: np.ndarray, names: list[str] | None) -> dict[str, list]:
    """Precision, recall, F1 and support per class from a [true, predicted] confusion matrix."""
    labels = names or [str(k) for k in range(len(matrix))]
    table: dict[str, list] = {"class": [], "precision": [], "recall": [], "f1": [], "support": []}
    for k, label in enumerate(labels):
        predicted, actual = int(matrix[:, k].sum()), int(matrix[k, :].sum())
        precision = float(matrix[k, k] / predicted) if predicted else 0.0
        recall = float(matrix[k, k] / actual) if actual else 0.0
        table["class"].append(label)
        table["precision"].append(round(precision, 6))
        table["recall"].append(round(recall, 6))
        table["f1"].append(round(2 * precision * recall / (precision + recall), 6)
                           if precision + recall else 0.0)
        table["support"].append(actual)
    return table


def log_confusion(mlc, run_id: str, matrix: np.ndarray, names: list[str] | None,
                  title: str = "") -> dict[str, float]:
    """Accuracy and per-class precision/recall (returned as metrics), the confusion matrix as
    confusion_matrix.png and .json, and per_class_metrics.json (an MLflow table)."""
    import pandas as pd

    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=np.int64)
    total = matrix.sum()
    metrics = {"accuracy": float(np.trace(matrix) / total) if total else 0.0}
    table = per_class_table(matrix, names)
    for k in range(len(matrix)):
        metrics[f"precision_class_{k}"] = table["precision"][k]
        metrics[f"recall_class_{k}"] = table["recall"][k]
    labels = table["class"]
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * len(labels), 1.2 + 0.6 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}accuracy {metrics['accuracy']:.4f}")
    fig.tight_layout()
    mlc.log_figure(run_id, fig, "confusion_matrix.png")
    plt.close(fig)
    mlc.log_dict(run_id, {"labels": labels, "matrix": matrix.tolist()}, "confusion_matrix.json")
    mlc.log_table(run_id, data=pd.DataFrame(table), artifact_file="per_class_metrics.json")
    return metrics


# Panels of the learning-curve figure: (title, [(metric key, line label)]). Keys a run does not
# have are left out, so classification and regression runs share it.
CURVES = [
    ("loss", [("train_loss", "train"), ("val_loss", "validation")]),
    ("accuracy", [("train_accuracy", "train"), ("val_accuracy", "validation")]),
    ("error", [("val_mae", "validation MAE"), ("val_rmse", "validation RMSE")]),
]


def log_learning_curves(mlc, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """learning_curves.png (loss and accuracy or error by epoch) from the run's metric history,
    which includes epochs from before a restart or `--resume`. Returns the plotted series."""
    plt = _pyplot()
    series = {}
    for _, lines in CURVES:
        for key, _ in lines:
            history = sorted((m.step, m.value) for m in mlc.get_metric_history(run_id, key))
            if history:
                series[key] = history
    panels = [(title, [(k, label) for k, label in lines if k in series]) for title, lines in CURVES]
    panels = [(title, lines) for title, lines in panels if lines]
    if not panels:
        return series
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for key, label in lines:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    mlc.log_figure(run_id, fig, "learning_curves.png")
    plt.close(fig)
    return series


def result_summary(metrics: dict[str, Any]) -> str:
    """`val_accuracy 0.9625, val_loss 0.1234` for the metrics present (model version text)."""
    keys = [k for k in ("val_accuracy", "val_loss", "val_rmse", "val_mae", "val_r2") if k in metrics]
    return ", ".join(f"{k} {float(metrics[k]):.4f}" for k in keys)
