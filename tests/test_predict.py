"""Batch prediction with the model trained in the session fixture: real Ray Data, real Parquet."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_cli
from pipeline import tracking
from pipeline.config import PredictJobConfig, load_config
from pipeline.errors import PipelineError
from pipeline.model import build_model, pad_arrow
from pipeline.predict import run_prediction
from pipeline.train import CHECKPOINT_FILE


def predict_config(trained, input_path, output, *extra):
    return load_config(PredictJobConfig, None, [
        "predict.model=models:/lstm-classifier@current",
        f"predict.input_path={input_path}",
        f"predict.output_path={output}",
        "predict.batch_size=100",
        f"tracking.tracking_uri={trained['result'].tracking_uri}",
        *extra,
    ])


def trained_module(trained):
    state = torch.load(os.path.join(trained["result"].checkpoint_path, CHECKPOINT_FILE),
                       weights_only=True)
    module = build_model(state["meta"]).eval()
    module.load_state_dict(state["model"])
    return module


def test_predict_by_alias_matches_the_trained_module(ray_session, trained, tmp_path):
    val = trained["data"] / "val"
    res = run_prediction(predict_config(trained, val, tmp_path / "out"))
    out = pq.read_table(tmp_path / "out")
    inp = pq.read_table(val)
    assert out.num_rows == inp.num_rows == res.rows == 400
    assert set(out.column_names) == {"id", "label", "prediction", "probabilities"}
    assert sorted(out.column("id").to_pylist()) == sorted(inp.column("id").to_pylist())
    probs = np.stack(out.column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # Join on id (the order may differ) and compare with the module's own forward pass.
    order = {i: k for k, i in enumerate(out.column("id").to_pylist())}
    idx = [order[i] for i in inp.column("id").to_pylist()]
    x, lengths, _ = pad_arrow(inp.column("features"))  # lengths 4..14: variable-length input
    assert len(set(lengths.tolist())) > 5
    with torch.no_grad():
        expected = torch.softmax(trained_module(trained)(torch.from_numpy(x), torch.from_numpy(lengths)), 1)
    np.testing.assert_allclose(probs[idx], expected.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.column("prediction"))[idx], expected.argmax(1).numpy())
    # The MLflow run: params name the resolved model, metrics match a direct computation.
    mlc = tracking.client(trained["result"].tracking_uri)
    run = mlc.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.version"] == trained["result"].version
    assert run.data.params["model.run_id"] == trained["result"].run_id
    assert run.data.tags["model_uri"] == f"models:/lstm-classifier/{trained['result'].version}"
    labels = np.asarray(out.column("label"))
    direct = float((labels == np.asarray(out.column("prediction"))).mean())
    assert run.data.metrics["accuracy"] == pytest.approx(direct)
    assert res.accuracy == pytest.approx(direct) and direct > 0.8
    assert run.data.metrics["rows"] == 400 and run.data.metrics["rows_per_second"] > 0
    k = 1
    tp = int(((labels == k) & (np.asarray(out.column("prediction")) == k)).sum())
    assert run.data.metrics[f"recall_class_{k}"] == pytest.approx(tp / (labels == k).sum())
    artifacts = {a.path for a in mlc.list_artifacts(res.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix.json"} <= artifacts
    with open(mlc.download_artifacts(res.run_id, "confusion_matrix.json")) as fh:
        matrix = np.array(json.load(fh)["matrix"])
    assert matrix.sum() == 400 and np.trace(matrix) == int((labels == np.asarray(out.column("prediction"))).sum())


def test_unlabelled_input_and_overwrite(ray_session, trained, tmp_path):
    src = pq.read_table(trained["data"] / "val" / "part-00000.parquet").drop_columns(["label"])
    (tmp_path / "in").mkdir()
    pq.write_table(src, tmp_path / "in" / "x.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    cfg = predict_config(trained, tmp_path / "in", tmp_path / "out", "predict.overwrite=true")
    res = run_prediction(cfg)
    out = pq.read_table(tmp_path / "out")
    assert out.num_rows == src.num_rows and "label" not in out.column_names
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert res.accuracy is None
    assert "accuracy" not in tracking.client(trained["result"].tracking_uri).get_run(res.run_id).data.metrics


def test_failure_mid_write_leaves_no_partial_output(ray_session, trained, tmp_path):
    """A bad row past the up-front sample fails the job while blocks are already written."""
    src = pq.read_table(trained["data"] / "val")
    (tmp_path / "in").mkdir()
    for i in range(3):
        pq.write_table(src, tmp_path / "in" / f"part-{i}.parquet", row_group_size=100)
    feats = src.column("features").to_pylist()
    feats[-1][0][0] = float("nan")  # beyond the first 2048 rows checked up front
    big = pa.concat_tables([src] * 6).set_column(
        1, "features", pa.array(feats * 6, type=src.schema.field("features").type))
    pq.write_table(big, tmp_path / "in" / "part-3.parquet", row_group_size=100)
    cfg = predict_config(trained, tmp_path / "in", tmp_path / "out")
    with pytest.raises(Exception) as err:
        run_prediction(cfg)
    assert "NaN or inf" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out")] == []
    mlc = tracking.client(trained["result"].tracking_uri)
    runs = mlc.search_runs([mlc.get_experiment_by_name("lstm-pipeline-predict").experiment_id],
                           filter_string="attributes.status = 'RUNNING'")
    assert runs == []


@pytest.mark.parametrize("case", ["unknown_model", "unknown_alias", "n_features", "output_exists",
                                  "empty_input", "missing_input"])
def test_predict_errors_are_one_clear_line(trained, tmp_path, case):
    uri = trained["result"].tracking_uri
    model, inp, expected = "models:/lstm-classifier@current", str(trained["data"] / "val"), None
    out = tmp_path / "out"
    if case == "unknown_model":
        model, expected = "models:/nope@current", "model models:/nope@current not found: no registered model 'nope'; registered models: lstm-classifier"
    elif case == "unknown_alias":
        model, expected = "models:/lstm-classifier@prod", "not found: 'lstm-classifier' has versions 1 and aliases @current"
    elif case == "n_features":
        (tmp_path / "in").mkdir()
        pq.write_table(pa.table({"features": pa.array([[[1.0] * 7] * 3], type=pa.list_(pa.list_(pa.float32())))}),
                       tmp_path / "in" / "a.parquet")
        inp, expected = str(tmp_path / "in"), "the input has 7 features per step, the model models:/lstm-classifier@current was trained on 4"
    elif case == "output_exists":
        out.mkdir()
        (out / "keep.txt").write_text("x")
        expected = "already exists: pass --overwrite"
    elif case == "empty_input":
        (tmp_path / "in").mkdir()
        inp, expected = str(tmp_path / "in"), "holds no Parquet files"
    elif case == "missing_input":
        inp, expected = str(tmp_path / "nowhere"), "does not exist"
    proc = run_cli("predict", "--model", model, "--input", inp, "--output", str(out),
                   f"tracking.tracking_uri={uri}", cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    if case == "output_exists":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not out.exists()
    mlc = tracking.client(uri)
    exp = mlc.get_experiment_by_name("lstm-pipeline-predict")
    if exp is not None:
        assert mlc.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'") == []


def test_predict_config_requires_model_input_output():
    with pytest.raises(PipelineError, match="predict.model is required"):
        run_prediction(load_config(PredictJobConfig, None, []))
