"""Regression and forecasting: `data prepare --window --horizon` on noisy sines -> a multi-output
regression model (2 DDP workers) that beats the last-value baseline in batch predict and pyfunc."""

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import small_config
from pipeline import tracking
from pipeline.config import PredictJobConfig, load_config
from pipeline.model import ModelSpec, build_model, pad_arrow
from pipeline.predict import run_prediction
from pipeline.prepare import PrepareSpec, prepare
from pipeline.checkpoints import CHECKPOINT_FILE
from pipeline.train import run_training

WINDOW, HORIZON = 16, 3


def sines(n_series: int = 40, length: int = 120, seed: int = 0) -> pd.DataFrame:
    """Noisy sines with a random period (8-16 steps), phase and amplitude (1-2) per series."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_series):
        t = np.arange(length)
        period, phase = rng.uniform(8, 16), rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(1, 2)
        value = amp * np.sin(2 * np.pi * t / period + phase) + rng.normal(0, 0.1, length)
        frames.append(pd.DataFrame({"series": i, "t": t, "value": value}))
    return pd.concat(frames).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def predict_cfg(model: str, uri: str, inp, out, *extra):
    return load_config(PredictJobConfig, None, [
        f"predict.model={model}", f"predict.input_path={inp}", f"predict.output_path={out}",
        f"tracking.tracking_uri={uri}", *extra])


@pytest.fixture(scope="module")
def forecast(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("forecast")
    df = sines()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), root / "series.parquet")
    res = prepare(PrepareSpec(input=[str(root / "series.parquet")], out=str(root / "windows"),
                              id_col="series", time_col="t", window=WINDOW, horizon=HORIZON,
                              stride=2, val_fraction=0.25, shards=2))
    out = Path(res.out)
    cfg = small_config(out, root, **{"model.task": "regression", "train.epochs": 4,
                                     "data.batch_size": 64, "train.lr": 0.01,
                                     "tracking.registered_model_name": "forecaster"})
    return {"df": df, "out": out, "train": run_training(cfg), "root": root, "facts": res.facts}


def test_windows_are_past_steps_and_next_values(forecast):
    df, out = forecast["df"], forecast["out"]
    t = pq.read_table(out / "val")
    assert t.schema.field("label").type == pa.list_(pa.float32())
    row = t.slice(5, 1).to_pylist()[0]
    series = df[df.series == row["id"]].sort_values("t").set_index("t").value
    end = row["end_time"]
    np.testing.assert_allclose([s[0] for s in row["features"]],
                               series.loc[end - WINDOW + 1:end].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(row["label"], series.loc[end + 1:end + HORIZON].to_numpy(), rtol=1e-6)
    ids = lambda split: set(pq.read_table(out / split).column("id").to_pylist())  # noqa: E731
    assert not ids("train") & ids("val")
    assert forecast["facts"]["task"] == "regression"


def test_forecast_beats_the_last_value_baseline(forecast, tmp_path):
    res = forecast["train"]
    assert {"val_mae", "val_rmse", "val_r2", "val_loss"} <= set(res.val_metrics)
    pred = run_prediction(predict_cfg("models:/forecaster@current", res.tracking_uri,
                                      forecast["out"] / "val", tmp_path / "pred",
                                      "predict.passthrough_columns=[id,end_time,label]"))
    out = pq.read_table(tmp_path / "pred")
    assert out.schema.field("prediction").type == pa.list_(pa.float64())
    inp = pq.read_table(forecast["out"] / "val")
    y = np.array(out.column("label").to_pylist())
    p = np.array(out.column("prediction").to_pylist())
    rmse = float(np.sqrt(((p - y) ** 2).mean()))
    # The baseline repeats each window's last value for every step ahead; join on (id, end_time).
    last = {(i, e): f[-1][0] for i, e, f in zip(inp.column("id").to_pylist(),
                                                 inp.column("end_time").to_pylist(),
                                                 inp.column("features").to_pylist())}
    keys = list(zip(out.column("id").to_pylist(), out.column("end_time").to_pylist()))
    assert len(set(keys)) == len(keys) == inp.num_rows
    base_rmse = float(np.sqrt(((np.array([last[k] for k in keys])[:, None] - y) ** 2).mean()))
    print(f"forecast RMSE {rmse:.4f} vs last-value baseline {base_rmse:.4f} "
          f"({len(y)} validation windows, horizon {HORIZON})")
    assert rmse < 0.6 * base_rmse
    mlc = tracking.client(res.tracking_uri)
    metrics = mlc.get_run(pred.run_id).data.metrics
    assert metrics["rmse"] == pytest.approx(rmse, rel=1e-4) and metrics["r2"] > 0.8
    # The pyfunc model (model-from-code) gives the same floats and declares them in its signature.
    model = mlflow.pyfunc.load_model(res.model_uri)
    assert model.metadata.signature.outputs.to_dict()[0]["name"] == "prediction"
    sample = inp.slice(0, 4).to_pandas()[["features"]]
    got = np.stack(model.predict(sample)["prediction"].to_list())
    x, lengths, _ = pad_arrow(inp.slice(0, 4).column("features"))
    state = torch.load(Path(res.checkpoint_path) / CHECKPOINT_FILE, weights_only=True)
    module = build_model(ModelSpec.from_dict(state["meta"])).eval()
    module.load_state_dict(state["model"])
    with torch.no_grad():
        np.testing.assert_allclose(got, module(torch.from_numpy(x), torch.from_numpy(lengths)).numpy(),
                                   atol=1e-4)


def test_a_forecasting_dataset_needs_model_task_regression(forecast, tmp_path):
    from conftest import run_cli

    proc = run_cli("train", f"data.train_path={forecast['out'] / 'train'}",
                   f"data.val_path={forecast['out'] / 'val'}",
                   f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: data.train_path holds a regression dataset (made by `data prepare`) but model.task "
        "is classification: set model.task=regression"]
    assert not (tmp_path / "mlflow.db").exists()  # failed before any MLflow run
