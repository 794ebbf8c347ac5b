"""What a training run leaves in MLflow, read back through MlflowClient from the real store and
checked against direct computations: name, description, provenance, dataset inputs, plots,
confusion matrix, per-class table, system metrics, and the registered model version."""

from __future__ import annotations

import json
import re
import subprocess

import matplotlib.image
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO
from pipeline import report, tracking
from pipeline.model import pad_arrow
from test_predict import trained_module


def _files(split_dir):
    return sorted(str(p) for p in split_dir.glob("*.parquet"))


def test_the_run_is_named_described_and_traceable(trained):
    res = trained["result"]
    run = tracking.client(res.tracking_uri).get_run(res.run_id)
    assert re.fullmatch(r"classification-lstm-h32x1-\d{8}-\d{6}", run.info.run_name)
    note = run.data.tags["mlflow.note.content"]
    assert "pytest trained fixture" in note and "hidden_size: 32" in note and "epochs: 4" in note
    assert run.data.tags["mlflow.source.name"] == "lstm-pipeline train"
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert run.data.tags["mlflow.source.git.commit"].split("+")[0] == head


def test_datasets_are_recorded_with_rows_and_digest(trained):
    res = trained["result"]
    run = tracking.client(res.tracking_uri).get_run(res.run_id)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation"}
    for context, split, rows in (("train", "train", 1600), ("validation", "val", 400)):
        ds = inputs[context]
        assert json.loads(ds.profile) == {"num_rows": rows, "num_files": 2}
        assert ds.digest == report.data_digest(_files(trained["data"] / split))
        assert json.loads(ds.source)["uri"] == str(trained["data"] / split)
        assert ds.name == split
    assert run.data.tags["data_digest"] == inputs["train"].digest
    # Touching a file changes the digest: it tells which data trained a model.
    assert report.data_digest(_files(trained["data"] / "val")[:1]) != inputs["validation"].digest


def test_the_confusion_matrix_and_per_class_table_match_a_direct_computation(trained, tmp_path):
    res = trained["result"]
    mlc = tracking.client(res.tracking_uri)
    with open(mlc.download_artifacts(res.run_id, "confusion_matrix.json", str(tmp_path))) as fh:
        logged = json.load(fh)
    # The best checkpoint's model over the validation set, outside Ray and MLflow.
    val = pq.read_table(trained["data"] / "val")
    x, lengths, _ = pad_arrow(val.column("features"))
    with torch.no_grad():
        predicted = trained_module(trained)(torch.from_numpy(x), torch.from_numpy(lengths)).argmax(1).numpy()
    labels = np.asarray(val.column("label"))
    direct = np.zeros((3, 3), dtype=int)
    np.add.at(direct, (labels, predicted), 1)
    assert logged["labels"] == ["0", "1", "2"]
    np.testing.assert_array_equal(np.array(logged["matrix"]), direct)
    assert np.trace(direct) / direct.sum() == pytest.approx(res.val_accuracy)

    with open(mlc.download_artifacts(res.run_id, "per_class_metrics.json", str(tmp_path))) as fh:
        table = json.load(fh)  # MLflow's table artifact: {"columns": [...], "data": [[...], ...]}
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    for k, row in enumerate(rows):
        assert row["class"] == str(k) and row["support"] == int((labels == k).sum())
        assert row["precision"] == pytest.approx(direct[k, k] / direct[:, k].sum(), abs=1e-6)
        assert row["recall"] == pytest.approx(direct[k, k] / direct[k, :].sum(), abs=1e-6)


def test_learning_curves_and_system_metrics(trained, tmp_path):
    res = trained["result"]
    mlc = tracking.client(res.tracking_uri)
    artifacts = {a.path: a for a in mlc.list_artifacts(res.run_id)}
    assert {"learning_curves.png", "confusion_matrix.png", "config.yaml"} <= set(artifacts)
    for name in ("learning_curves.png", "confusion_matrix.png"):
        image = matplotlib.image.imread(mlc.download_artifacts(res.run_id, name, str(tmp_path)))
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image[..., :3].std() > 0.01  # not a blank canvas
    # The curves drawn are the epoch history (loss and accuracy panels).
    series = report.log_learning_curves(mlc, res.run_id)
    assert [s for s, _ in series["val_loss"]] == [1, 2, 3, 4]
    assert set(series) >= {"train_loss", "val_loss", "val_accuracy"}
    metrics = mlc.get_run(res.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert 0 < metrics["system/system_memory_usage_megabytes"]


def test_the_model_version_says_what_it_is(trained):
    import mlflow

    res = trained["result"]
    mlc = tracking.client(res.tracking_uri)
    run = mlc.get_run(res.run_id)
    mv = mlc.get_model_version(res.registered_name, res.version)
    assert res.run_id in mv.description and run.info.run_name in mv.description
    assert f"val_accuracy {run.data.metrics['best_val_accuracy']:.4f}" in mv.description
    assert mv.tags["data_digest"] == run.data.tags["data_digest"]
    assert mv.tags["checkpoint"] == res.checkpoint_path and mv.tags["task"] == "classification"
    # models:/ URIs resolve through MLflow's global URIs, which other in-process jobs moved.
    mlflow.set_tracking_uri(res.tracking_uri)
    mlflow.set_registry_uri(res.tracking_uri)
    info = mlflow.models.get_model_info(f"models:/{res.registered_name}/{res.version}")
    assert info.signature.inputs.input_names() == ["features"]
    assert "prediction" in info.signature.outputs.input_names()
    assert info.saved_input_example_info is not None


def test_no_credential_is_recorded(trained, tmp_path):
    """The fixture's command and config carry a password (conftest.SECRET): params, tags, the
    description and the config artifact show the URIs with *** instead."""
    from conftest import SECRET

    res = trained["result"]
    mlc = tracking.client(res.tracking_uri)
    run = mlc.get_run(res.run_id)
    texts = list(run.data.params.values()) + list(run.data.tags.values())
    texts.append(open(mlc.download_artifacts(res.run_id, "config.yaml", str(tmp_path))).read())
    assert not [t for t in texts if SECRET in t]
    assert run.data.params["scaling.address"] == "ray://ci:***@head:10001"
    assert "https://ci:***@mlflow.example" in run.data.tags["mlflow.note.content"]
