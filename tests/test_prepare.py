"""`data prepare`: a long-format CSV of readings -> shards -> train -> predict, end to end; and
every bad-table case through the real CLI (one clear line, exit != 0, nothing written)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_cli, small_config
from pipeline.config import PredictJobConfig, load_config
from pipeline.errors import DataError
from pipeline.predict import run_prediction
from pipeline.prepare import PrepareSpec, prepare
from pipeline.checkpoints import CHECKPOINT_FILE
from pipeline.train import run_training

CLASSES = ["falling", "flat", "rising"]  # sorted: indices 0, 1, 2


def readings(n_seq: int = 240, seed: int = 0) -> pd.DataFrame:
    """Shuffled readings of variable-length sequences; the class is the trend of `temp` over
    time, so a model only learns it from correctly ordered steps. Offsets and scales far from
    0/1 make normalization matter."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_seq):
        label = CLASSES[i % 3]
        n = int(rng.integers(6, 21))
        t0 = pd.Timestamp("2024-01-01") + pd.Timedelta(hours=int(rng.integers(0, 1000)))
        steps = np.arange(n)
        slope = {"falling": -1.0, "flat": 0.0, "rising": 1.0}[label]
        frames.append(pd.DataFrame({
            "machine": f"m-{i:04d}",
            "ts": t0 + pd.to_timedelta(steps * 15, unit="min"),
            "temp": 60.0 + 4.0 * slope * steps / n * 5 + rng.normal(0, 1.5, n),
            "vibration": 1000.0 + rng.normal(0, 50, n),
            "state": label,
        }))
    return pd.concat(frames).sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    df = readings()
    df.to_csv(root / "readings.csv", index=False)
    res = prepare(PrepareSpec(input=[str(root / "readings.csv")], out=str(root / "shards"),
                              id_col="machine", time_col="ts", feature_cols=["temp", "vibration"],
                              label_col="state", val_fraction=0.25, shards=2, seed=3))
    return {"root": root, "df": df, "out": Path(res.out), "result": res}


def test_prepare_sorts_splits_and_names_classes(prepared):
    df, out = prepared["df"], prepared["out"]
    train, val = pq.read_table(out / "train"), pq.read_table(out / "val")
    train_ids, val_ids = set(train.column("id").to_pylist()), set(val.column("id").to_pylist())
    assert not train_ids & val_ids  # split by sequence id: no id on both sides
    assert train_ids | val_ids == set(df.machine)
    assert len(val_ids) == 60 and train.num_rows + val.num_rows == 240
    assert prepared["result"].facts["class_names"] == CLASSES
    both = pa.concat_tables([train, val]).to_pandas().set_index("id")
    for machine in ["m-0000", "m-0001", "m-0002", "m-0117", "m-0239"]:
        rows = df[df.machine == machine].sort_values("ts")
        got = np.array([list(step) for step in both.loc[machine, "features"]])
        np.testing.assert_allclose(got, rows[["temp", "vibration"]].to_numpy(), rtol=1e-6)
        assert both.loc[machine, "label"] == CLASSES.index(rows.state.iloc[0])
    # The same seed gives the same split.
    again = prepare(PrepareSpec(input=[str(prepared["root"] / "readings.csv")],
                                out=str(prepared["root"] / "again"), id_col="machine", time_col="ts",
                                label_col="state", val_fraction=0.25, shards=2, seed=3))
    assert set(pq.read_table(Path(again.out) / "val").column("id").to_pylist()) == val_ids
    assert again.facts["features"] == ["temp", "vibration"]  # numeric columns by default


@pytest.fixture(scope="module")
def classifier(ray_session, prepared, tmp_path_factory):
    store = tmp_path_factory.mktemp("prep-store")
    out = prepared["out"]
    cfg = small_config(out, store, **{"train.epochs": 4, "data.batch_size": 32,
                                      "tracking.registered_model_name": "readings"})
    return {"result": run_training(cfg), "store": store}


def test_csv_to_predictions_with_class_names(ray_session, prepared, classifier, tmp_path):
    res = classifier["result"]
    assert res.val_accuracy >= 0.9
    cfg = load_config(PredictJobConfig, None, [
        "predict.model=models:/readings@current", f"predict.input_path={prepared['out'] / 'val'}",
        f"predict.output_path={tmp_path / 'pred'}", f"tracking.tracking_uri={res.tracking_uri}"])
    pred = run_prediction(cfg)
    out = pq.read_table(tmp_path / "pred").to_pandas()
    assert set(out.label_name) <= set(CLASSES) and len(set(out.label_name)) == 3
    assert (out.label_name == [CLASSES[i] for i in out.prediction]).all()
    truth = prepared["df"].groupby("machine").state.first()
    accuracy = float((out.label_name == truth.loc[out.id].to_numpy()).mean())
    assert accuracy == pytest.approx(pred.accuracy) and accuracy >= 0.9
    print(f"prepare -> train -> predict: validation accuracy {accuracy:.4f} on {len(out)} sequences")


def test_normalization_statistics_are_the_training_splits(prepared, classifier):
    state = torch.load(Path(classifier["result"].checkpoint_path) / CHECKPOINT_FILE, weights_only=True)
    norm = state["meta"]["normalization"]
    steps = np.concatenate([np.array([list(s) for s in seq]) for seq in
                            pq.read_table(prepared["out"] / "train").column("features").to_pylist()])
    np.testing.assert_allclose(norm["mean"], steps.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(norm["std"], steps.std(axis=0), rtol=1e-5)
    assert norm["count"] == len(steps)
    val_steps = np.concatenate([np.array([list(s) for s in seq]) for seq in
                                pq.read_table(prepared["out"] / "val").column("features").to_pylist()])
    all_mean = np.concatenate([steps, val_steps]).mean(axis=0)
    assert not np.allclose(norm["mean"], all_mean, rtol=1e-9)  # validation rows not included


SCALE, SHIFT = {"temp": 0.01, "vibration": 250.0}, {"temp": -3.0, "vibration": 1e5}


def test_training_on_shifted_scaled_readings_predicts_the_same(ray_session, prepared, classifier,
                                                              tmp_path):
    """The same readings with each feature multiplied and shifted: `data prepare` makes the same
    split, training stores statistics that follow the transform exactly, and batch predict (which
    applies the stored statistics) gives the original model's predictions."""
    df = prepared["df"].copy()
    for col in SCALE:
        df[col] = df[col] * SCALE[col] + SHIFT[col]
    df.to_csv(tmp_path / "moved.csv", index=False)
    moved = Path(prepare(PrepareSpec(input=[str(tmp_path / "moved.csv")], out=str(tmp_path / "shards"),
                                     id_col="machine", time_col="ts", feature_cols=["temp", "vibration"],
                                     label_col="state", val_fraction=0.25, shards=2, seed=3)).out)
    cfg = small_config(moved, tmp_path, **{"train.epochs": 3, "data.batch_size": 32,
                                           "scaling.num_workers": 1,
                                           "tracking.registered_model_name": "moved"})
    res = run_training(cfg)
    metas = [torch.load(Path(r.checkpoint_path) / CHECKPOINT_FILE, weights_only=True)["meta"]
             for r in (classifier["result"], res)]
    scale, shift = np.array(list(SCALE.values())), np.array(list(SHIFT.values()))
    orig, new = metas[0]["normalization"], metas[1]["normalization"]
    np.testing.assert_allclose(new["mean"], np.array(orig["mean"]) * scale + shift, rtol=1e-5)
    np.testing.assert_allclose(new["std"], np.array(orig["std"]) * scale, rtol=1e-4)
    outs = []
    for model, data, uri in (("models:/readings@current", prepared["out"], classifier["result"]),
                             ("models:/moved@current", moved, res)):
        cfg = load_config(PredictJobConfig, None, [
            f"predict.model={model}", f"predict.input_path={data / 'val'}",
            f"predict.output_path={tmp_path / model[9:14]}", f"tracking.tracking_uri={uri.tracking_uri}"])
        run_prediction(cfg)
        outs.append(pq.read_table(tmp_path / model[9:14]).to_pandas().set_index("id").sort_index())
    assert list(outs[0].index) == list(outs[1].index)  # the same validation machines
    agree = float((outs[0].label_name == outs[1].label_name).mean())
    accuracy = [float((o.prediction == o.label).mean()) for o in outs]
    print(f"shifted/scaled readings: accuracy {accuracy[0]:.4f} vs {accuracy[1]:.4f}, "
          f"predictions agree on {agree:.4f}")
    assert agree >= 0.95 and min(accuracy) >= 0.9


# --------------------------------------------------------------------------- bad tables


def _table(tmp: Path, name: str, frame: pd.DataFrame) -> Path:
    path = tmp / name
    frame.to_csv(path, index=False)
    return path


def _base(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame({"sid": np.repeat(["a", "b", "c"], n), "t": np.tile(np.arange(n), 3),
                         "x": np.arange(3 * n, dtype=float), "y": "k",
                         "lab": np.repeat(["u", "v", "u"], n)})


def _case(case: str, tmp: Path) -> tuple[list[str], str]:
    df = _base()
    args = ["--id-col", "sid", "--time-col", "t", "--label-col", "lab"]
    if case == "duplicate":
        df = pd.concat([df, df.iloc[[7]]])
        return ["--input", str(_table(tmp, "r.csv", df)), *args, "--feature-cols", "x"], \
            "duplicate (sid, t) pair sid='b', t=1"
    if case == "non_numeric":
        return ["--input", str(_table(tmp, "r.csv", df)), *args, "--feature-cols", "x,y"], \
            "--feature-cols: column 'y' in"
    if case == "label_varies":
        df.loc[8, "lab"] = "v2"
        return ["--input", str(_table(tmp, "r.csv", df)), *args, "--feature-cols", "x"], \
            "column 'lab' in"
    if case == "missing":
        df.loc[9, "x"] = np.nan
        return ["--input", str(_table(tmp, "r.csv", df)), *args, "--feature-cols", "x"], \
            "column 'x' in"
    if case == "no_column":
        return ["--input", str(_table(tmp, "r.csv", df)), *args, "--feature-cols", "z"], \
            "--feature-cols: no column 'z'"
    raise AssertionError(case)


CASE_HINTS = {"duplicate": "keep one reading", "non_numeric": "not numeric",
              "label_varies": "varies within sequence sid='b'", "missing": "--missing ffill",
              "no_column": "check the spelling"}


@pytest.mark.parametrize("case", sorted(CASE_HINTS))
def test_bad_tables_fail_cleanly_and_write_nothing(case, tmp_path):
    args, must = _case(case, tmp_path)
    proc = run_cli("data", "prepare", *args, "--out", str(tmp_path / "out"), cwd=tmp_path,
                   timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert must in lines[0] and CASE_HINTS[case] in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]  # no output, no staging left


def test_missing_values_fill_forward_or_drop(tmp_path):
    df = _base()
    df.loc[9, "x"] = np.nan   # b, t=3: filled with b's t=2 value
    df.loc[12, "x"] = np.nan  # c, t=0: nothing before it in c: dropped under ffill too
    src = _table(tmp_path, "r.csv", df)
    common = dict(input=[str(src)], id_col="sid", time_col="t", feature_cols=["x"],
                  label_col="lab", val_fraction=0.34, shards=1)
    with pytest.raises(DataError, match="missing values"):
        prepare(PrepareSpec(out=str(tmp_path / "e"), **common))
    ffill = prepare(PrepareSpec(out=str(tmp_path / "f"), missing="ffill", **common))
    dropped = prepare(PrepareSpec(out=str(tmp_path / "d"), missing="drop", **common))
    seqs = {}
    for name, res in (("f", ffill), ("d", dropped)):
        t = pa.concat_tables([pq.read_table(Path(res.out) / s) for s in ("train", "val")])
        seqs[name] = {i: [s[0] for s in f] for i, f in zip(t.column("id").to_pylist(),
                                                           t.column("features").to_pylist())}
    assert seqs["f"]["b"] == [6, 7, 8, 8, 10, 11] and seqs["f"]["c"] == [13, 14, 15, 16, 17]
    assert seqs["d"]["b"] == [6, 7, 8, 10, 11] and seqs["d"]["a"] == [0, 1, 2, 3, 4, 5]


def test_uea_reads_only_shipped_files(tmp_path):
    """`data uea`: with aeon installed, a shipped dataset becomes shards with class names; a
    name the wheel does not ship (or aeon missing) is one clear error and nothing is written."""
    import importlib.util

    proc = run_cli("data", "uea", "NoSuchSet", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("not among the UEA/UCR datasets shipped" if importlib.util.find_spec("aeon")
            else "pip install 'lstm-pipeline[uea]'") in proc.stderr
    assert not (tmp_path / "x").exists()
    if importlib.util.find_spec("aeon") is None:
        return
    proc = run_cli("data", "uea", "BasicMotions", "--out", str(tmp_path / "bm"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    t = pq.read_table(tmp_path / "bm" / "train")
    assert t.num_rows == 40 and len(t.column("features")[0].as_py()[0]) == 6
    from pipeline.prepare import dataset_facts

    assert dataset_facts([str(next((tmp_path / "bm" / "train").glob("*.parquet")))])["class_names"] \
        == ["badminton", "running", "standing", "walking"]
