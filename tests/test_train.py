"""Real Ray Train DDP runs on the small synthetic task, tracked in a real SQLite MLflow store."""

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import cli_env, small_config
from pipeline import tracking
from pipeline.errors import DataError, TrainingError
from pipeline.model import ModelSpec, build_model, pad_arrow
from pipeline.checkpoints import CHECKPOINT_FILE
from pipeline.train import run_training

CHANCE = 1 / 3


def test_two_workers_learn_the_task(trained):
    # 3 balanced classes: chance is 0.33; the class is only visible in the first 3 steps.
    assert trained["result"].val_accuracy >= 0.8


def test_run_holds_params_metrics_config_and_model(trained):
    res = trained["result"]
    mlc = tracking.client(res.tracking_uri)
    run = mlc.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.hidden_size"] == "32" and params["scaling.num_workers"] == "2"
    assert params["data.n_features"] == "4" and params["data.num_classes_resolved"] == "3"
    assert params["train.storage_path"].startswith("/")  # made absolute on the driver
    tags = run.data.tags
    assert tags["num_workers"] == "2" and tags["device"] == "cpu" and tags["train_rows"] == "1600"
    # The workers started with the allocator settings of scaling.reuse_memory (pipeline/runtime.py).
    assert tags["worker_allocator"] == "reuse"
    for key in ("train_loss", "val_loss", "val_accuracy", "sequences_per_second", "epoch_seconds"):
        history = mlc.get_metric_history(res.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4], key
    losses = [m.value for m in sorted(mlc.get_metric_history(res.run_id, "train_loss"),
                                      key=lambda m: m.step)]
    assert losses[-1] < losses[0]
    steps = mlc.get_metric_history(res.run_id, "train_loss_step")
    assert len(steps) >= 4 and all(m.step % 5 == 0 for m in steps)
    artifacts = {a.path for a in mlc.list_artifacts(res.run_id)}
    assert "config.yaml" in artifacts
    config_text = mlc.download_artifacts(res.run_id, "config.yaml")
    assert "hidden_size: 32" in open(config_text).read()
    model = mlc.get_logged_model(res.model_uri.split("/")[-1])
    assert model.source_run_id == res.run_id


def test_registered_version_and_alias(trained):
    res = trained["result"]
    mlc = tracking.client(res.tracking_uri)
    mv = mlc.get_model_version_by_alias("lstm-classifier", "current")
    assert str(mv.version) == res.version and mv.run_id == res.run_id
    assert "val_accuracy" in mv.description


LOAD_SCRIPT = r"""
import sys, json
# Prove the logged model needs none of our code: importing `pipeline` or `jobs` fails here.
sys.modules["pipeline"] = None
sys.modules["jobs"] = None
import mlflow, numpy as np, pandas as pd, pyarrow.parquet as pq
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/lstm-classifier@current")
df = pq.read_table(sys.argv[2]).to_pandas()
out = model.predict(df[["features"]])
np.save(sys.argv[3], np.stack(out["probabilities"].to_numpy()))
np.save(sys.argv[4], out["prediction"].to_numpy())
"""


def test_registry_model_in_a_fresh_process_matches_the_trained_module(trained, tmp_path):
    res = trained["result"]
    table = pq.read_table(trained["data"] / "val" / "part-00000.parquet").slice(0, 50)
    pq.write_table(table, tmp_path / "batch.parquet")
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, res.tracking_uri, str(tmp_path / "batch.parquet"),
         str(tmp_path / "probs.npy"), str(tmp_path / "pred.npy")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The trained module, straight from the best checkpoint.
    state = torch.load(os.path.join(res.checkpoint_path, CHECKPOINT_FILE), weights_only=True)
    module = build_model(ModelSpec.from_dict(state["meta"])).eval()
    module.load_state_dict(state["model"])
    x, lengths, _ = pad_arrow(table.column("features"))
    with torch.no_grad():
        expected = torch.softmax(module(torch.from_numpy(x), torch.from_numpy(lengths)), 1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "pred.npy"), expected.argmax(1))


def test_one_worker_with_a_seeded_validation_split(ray_session, synth_dir, tmp_path):
    cfg = small_config(synth_dir, tmp_path, **{
        "scaling.num_workers": 1, "train.epochs": 2, "data.val_path": "null",
        "data.val_fraction": 0.25, "tracking.registered_model_name": "null",
        "scaling.reuse_memory": "false"})
    res = run_training(cfg)
    run = tracking.client(res.tracking_uri).get_run(res.run_id)
    assert run.info.status == "FINISHED" and res.version is None
    assert run.data.tags["worker_allocator"] == "default"
    assert run.data.tags["val_rows"] == "split"
    assert res.val_accuracy > CHANCE


def test_bad_values_beyond_the_sample_fail_the_run_clearly(ray_session, synth_dir, tmp_path):
    """Values past the up-front sample are checked while reading; the run ends FAILED, explained."""
    bad = tmp_path / "bad"
    bad.mkdir()
    table = pq.read_table(synth_dir / "train" / "part-00000.parquet")
    feats = table.column("features").to_pylist()
    feats[-1][0][0] = float("nan")
    import pyarrow as pa
    pq.write_table(table.set_column(1, "features", pa.array(feats, type=table.schema.field(1).type)),
                   bad / "part.parquet")
    cfg = small_config(synth_dir, tmp_path, **{
        "data.train_path": str(bad), "data.sample_rows": 10, "scaling.num_workers": 1,
        "train.epochs": 1})
    with pytest.raises((DataError, TrainingError)) as err:
        run_training(cfg)
    assert "NaN or inf" in str(err.value) and "data check" in str(err.value)
    mlc = tracking.client(tracking.resolve_tracking_uri(cfg.tracking.tracking_uri))
    runs = mlc.search_runs([mlc.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "NaN or inf" in runs[0].data.tags["error"]


def test_the_same_config_and_seed_repeat_the_same_run(ray_session, tmp_path):
    """Seeded initialisation, a data order fixed by the dataset rather than by which read task
    finishes first (the split across workers, epoch 1's stream, every later epoch) and seeded
    bucketing: two runs of one config give the same history. 8 shards, so that read tasks can
    finish in any order (with 2, both runs happened to agree even without the fix)."""
    from pipeline.synth import SynthSpec, write_synthetic

    write_synthetic(str(tmp_path / "data"), SynthSpec(rows=2400, val_rows=400, n_features=4,
                                                      num_classes=3, min_length=4, max_length=30,
                                                      shards=8, seed=11))
    runs = [run_training(small_config(tmp_path / "data", tmp_path / f"store{i}", **{
        "train.epochs": 2, "tracking.system_metrics": "false",
        "tracking.registered_model_name": "null"}), console=lambda line: None) for i in range(2)]

    def history(res, key):
        mlc = tracking.client(res.tracking_uri)
        return [m.value for m in sorted(mlc.get_metric_history(res.run_id, key), key=lambda m: m.step)]

    for key in ("val_loss", "train_loss", "val_accuracy"):
        first, second = history(runs[0], key), history(runs[1], key)
        assert len(first) == len(second) == 2
        np.testing.assert_allclose(second, first, rtol=0, atol=1e-6, err_msg=key)
