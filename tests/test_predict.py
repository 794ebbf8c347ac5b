"""Batch prediction with the model trained in the session fixture: real Ray Data, real Parquet."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import tracking
from pipeline.config import PredictJobConfig, load_config
from pipeline.errors import PipelineError
from pipeline.model import ModelSpec, build_model, pad_arrow
from pipeline.predict import run_prediction
from pipeline.checkpoints import CHECKPOINT_FILE


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
    module = build_model(ModelSpec.from_dict(state["meta"])).eval()
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
    # An output an earlier predict wrote (with labels): --overwrite replaces all of it.
    run_prediction(predict_config(trained, trained["data"] / "val", tmp_path / "out"))
    assert pq.read_table(tmp_path / "out").num_rows == 400
    cfg = predict_config(trained, tmp_path / "in", tmp_path / "out", "predict.overwrite=true")
    res = run_prediction(cfg)
    out = pq.read_table(tmp_path / "out")
    assert out.num_rows == src.num_rows and "label" not in out.column_names  # none of the old rows
    assert res.accuracy is None
    assert "accuracy" not in tracking.client(trained["result"].tracking_uri).get_run(res.run_id).data.metrics


def _with_ids(table, offset):
    return table.set_column(0, "id", pa.array(np.asarray(table.column("id")) + offset))


def test_a_failed_job_publishes_nothing_and_a_rerun_resumes(ray_session, trained, tmp_path):
    """A bad row past the up-front sample fails chunk 4 of 4 after 3 chunks were written: the
    target stays absent; fixed and rerun, the job skips the 3 finished chunks and publishes
    every row exactly once."""
    src = pq.read_table(trained["data"] / "val")
    (tmp_path / "in").mkdir()
    for i in range(3):
        pq.write_table(_with_ids(src, 10_000 * (i + 1)), tmp_path / "in" / f"part-{i}.parquet")
    big = pa.concat_tables([_with_ids(src, 100_000 * (k + 1)) for k in range(6)])  # 2400 rows
    feats = big.column("features").to_pylist()
    feats[-1][0][0] = float("nan")  # beyond the first 2048 rows checked up front
    bad = big.set_column(1, "features", pa.array(feats, type=src.schema.field("features").type))
    pq.write_table(bad, tmp_path / "in" / "part-3.parquet", row_group_size=100)
    cfg = predict_config(trained, tmp_path / "in", tmp_path / "out", "predict.chunk_bytes=1")
    with pytest.raises(Exception) as err:
        run_prediction(cfg)
    assert "NaN or inf" in str(err.value)
    assert not (tmp_path / "out").exists()
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(staging) == 1
    # The finished chunks, the one that failed, and the run that wrote them (for a rerun).
    assert sorted(p.name for p in staging[0].iterdir()) == ["_RUN.json", "chunk-00000", "chunk-00001",
                                                             "chunk-00002", "chunk-00003"]
    first = {p.name: p.stat().st_mtime_ns for p in (staging[0] / "chunk-00000").glob("*.parquet")}
    mlc = tracking.client(trained["result"].tracking_uri)
    exp = mlc.get_experiment_by_name("lstm-pipeline-predict").experiment_id
    assert mlc.search_runs([exp], filter_string="attributes.status = 'RUNNING'") == []

    pq.write_table(big, tmp_path / "in" / "part-3.parquet", row_group_size=100)  # fixed
    lines = []
    res = run_prediction(cfg, console=lines.append)
    assert any(line.startswith("resumed: 3 of 4 input chunks") for line in lines), lines
    out = pq.read_table(tmp_path / "out")
    ids = out.column("id").to_pylist()
    expected = [i for f in sorted((tmp_path / "in").iterdir()) for i in pq.read_table(f).column("id").to_pylist()]
    assert res.rows == len(ids) == len(set(ids)) == 3600 and sorted(ids) == sorted(expected)
    # The finished chunk was not redone: its files moved into place untouched.
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "chunk-00000").glob("*.parquet")} == first
    assert not list((tmp_path / "out").rglob("_DONE.json"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_predict_config_requires_model_input_output():
    with pytest.raises(PipelineError, match="predict.model is required"):
        run_prediction(load_config(PredictJobConfig, None, []))
