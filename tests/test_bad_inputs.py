"""The bad-input matrix: each malformed input through the real CLI in a subprocess.

Every case must: exit non-zero; print exactly one `error: ...` line on stderr naming the problem
(file, row, key or URI) and what to do; print no traceback; leave no MLflow run RUNNING; write
no partial output.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import free_port, run_cli
from pipeline import tracking
from test_data import make_case

DATA_CASES = {  # case in test_data.make_case -> what the line must say
    "missing": "does not exist",
    "empty_dir": "holds no Parquet files",
    "not_parquet_name": "notes.csv is not a Parquet file",
    "not_parquet_content": "b.parquet: not a readable Parquet file",
    "truncated": "b.parquet: not a readable Parquet file",
    "no_features": "b.parquet: no 'features' column",
    "no_label": "b.parquet: no 'label' column",
    "flat_features": "expected list<list<float>>",
    "string_features": "expected list<list<float>>",
    "width_across_files": "inconsistent n_features across files",
    "width_within_file": "b.parquet: inconsistent n_features: row 2",
    "nan": "b.parquet: NaN or inf feature values (first in row 3",
    "inf": "b.parquet: NaN or inf",
    "zero_length": "b.parquet: zero-length sequence in row 1",
    "negative_label": "b.parquet: negative label -1",
    "float_label": "column 'label' is double, expected integer",
}


def _train(path: Path, *extra: str) -> list[str]:
    return ["train", f"data.train_path={path}", "data.val_path=null", "data.val_fraction=0.2", *extra]


def build(case: str, tmp: Path, trained) -> tuple[list[str], str, Path | None]:
    """(CLI arguments, what the error line must contain, an output path that must not appear)."""
    if case in DATA_CASES:
        path, _ = make_case(tmp, case)
        return _train(path), DATA_CASES[case], None
    synth = trained["data"]
    good = [f"data.train_path={synth / 'train'}", f"data.val_path={synth / 'val'}"]
    uri = trained["result"].tracking_uri
    model = "models:/lstm-classifier@current"
    if case == "label_too_large":
        path, _ = make_case(tmp, "negative_label")  # labels 0, 1 and -1 ...
        pq.write_table(pa.table({"features": pa.array([[[1.0, 2.0]]], type=pa.list_(pa.list_(pa.float32()))),
                                 "label": [7]}), path / "b.parquet")  # ... replaced by a 7
        return _train(path, "data.num_classes=2"), "label 7 is out of range for 2 classes", None
    if case == "unknown_key":
        return ["train", *good, "model.hidden_sise=3"], "unknown config key model.hidden_sise", None
    if case == "wrong_type":
        return ["train", *good, "model.hidden_size=big"], "model.hidden_size must be an integer, got 'big'", None
    if case == "bad_override_syntax":
        return ["train", *good, "model.hidden_size"], "bad override 'model.hidden_size': write it as dotted.key=value", None
    if case == "missing_config_file":
        return ["train", "-c", str(tmp / "nope.yaml")], "nope.yaml does not exist", None
    if case == "too_many_workers":
        return ["train", *good, "scaling.num_workers=64"], "64 workers x 1 CPUs need 64 CPUs", None
    if case == "unreachable_mlflow":
        port = free_port()
        return (["train", *good, f"tracking.tracking_uri=http://127.0.0.1:{port}"],
                f"MLflow server at http://127.0.0.1:{port} is unreachable", None)
    if case == "unreachable_ray":
        port = free_port()
        return (["train", *good, f"scaling.address=127.0.0.1:{port}"],
                f"cannot reach the Ray cluster at 127.0.0.1:{port}", None)
    if case == "resume_unknown_run":
        return ["train", "--resume", "0" * 32], f"cannot resume run {'0' * 32}", None
    out = tmp / "out"
    predict = ["predict", "--model", model, "--input", str(synth / "val"), "--output", str(out),
               f"tracking.tracking_uri={uri}"]
    if case == "unknown_model_uri":
        predict[2] = "models:/nope@current"
        return predict, "model models:/nope@current not found: no registered model 'nope'", out
    if case == "unknown_alias":
        predict[2] = "models:/lstm-classifier@prod"
        return predict, "'lstm-classifier' has versions 1 and aliases @current", out
    if case == "model_n_features_differs":
        (tmp / "in").mkdir()
        pq.write_table(pa.table({"features": pa.array([[[1.0] * 7] * 3], type=pa.list_(pa.list_(pa.float32())))}),
                       tmp / "in" / "a.parquet")
        predict[4] = str(tmp / "in")
        return predict, "the input has 7 features per step, the model models:/lstm-classifier@current was trained on 4", out
    if case == "output_exists":
        out.mkdir()
        (out / "keep.txt").write_text("x")
        return predict, "already exists: pass --overwrite", None
    if case == "predict_missing_input":
        predict[4] = str(tmp / "nowhere")
        return predict, "does not exist", out
    return build_more(case, tmp, trained, good, predict, out)


def build_more(case: str, tmp: Path, trained, good: list[str], predict: list[str], out: Path):
    """Outputs that would destroy or mix with an input, late errors moved up front."""
    synth = trained["data"]
    copy = tmp / "data" / "s"  # a private copy of the validation shards, for cases that write near them
    if case.startswith(("predict_output", "predict_overwrite")):
        for split in ("val", "train"):
            (copy / split).mkdir(parents=True)
            for f in (synth / "val").iterdir():
                (copy / split / f.name).write_bytes(f.read_bytes())
    if case == "predict_output_is_input":
        return ([*predict[:3], "--input", str(copy / "val"), "--output", str(copy / "val"),
                 "--overwrite", *predict[7:]], "is the input --input", None)
    if case == "predict_output_holds_input":
        return ([*predict[:3], "--input", str(copy / "val"), "--output", str(copy), "--overwrite",
                 *predict[7:]], "holds the input --input", None)
    if case == "predict_output_inside_input":
        return ([*predict[:3], "--input", str(copy / "val"), "--output", str(copy / "val" / "p"),
                 *predict[7:]], "is inside the input --input", copy / "val" / "p")
    if case == "predict_overwrite_foreign":
        (tmp / "notes").mkdir()
        (tmp / "notes" / "todo.txt").write_text("mine")
        return ([*predict[:5], "--output", str(tmp / "notes"), "--overwrite", *predict[7:]],
                "holds todo.txt, which lstm-pipeline did not write", None)
    if case == "synth_out_is_cwd":
        (tmp / "notes.txt").write_text("mine")
        return ["data", "synth", "--out", ".", "--overwrite"], "is the working directory", None
    if case == "prepare_out_holds_input":
        (tmp / "tbl").mkdir()
        (tmp / "tbl" / "readings.csv").write_text("id,t,v,state\n" + "".join(
            f"{i},{t},{i * t},{'ab'[i % 2]}\n" for i in range(6) for t in range(3)))
        return (["data", "prepare", "--input", "tbl/readings.csv", "--out", "tbl", "--overwrite",
                 "--id-col", "id", "--time-col", "t", "--label-col", "state"],
                "holds the input --input tbl/readings.csv", None)
    if case == "tracking_uri_unsupported":
        return ["train", *good, "tracking.tracking_uri=foo://bar"], "is not a store MLflow can use", None
    if case == "predict_tracking_uri_unsupported":
        return ([*predict[:-1], "tracking.tracking_uri=foo://bar"], "is not a store MLflow can use",
                out)
    if case == "storage_path_is_file":
        (tmp / "file.txt").write_text("x")
        return (["train", *good, f"train.storage_path={tmp / 'file.txt'}"],
                "train.storage_path", None)
    if case == "alias_reserved":
        return ["train", *good, "tracking.alias=v1"], "tracking.alias 'v1' is refused by MLflow", None
    if case == "model_name_invalid":
        return (["train", *good, "tracking.registered_model_name=bad/name"],
                "tracking.registered_model_name 'bad/name' is refused by MLflow", None)
    if case == "empty_val_path":
        return ["train", *good[:1], "data.val_path="], "data.val_path is empty", None
    if case == "rows_fewer_than_workers":
        tiny = tmp / "tiny"
        rows = pq.read_table(synth / "train" / "part-00000.parquet")
        for split, n in (("train", 1), ("val", 2)):  # 1 training row, enough validation rows
            (tiny / split).mkdir(parents=True)
            pq.write_table(rows.filter(pa.array(np.asarray(rows.column("label")) == 0)).slice(0, n),
                           tiny / split / "a.parquet")
        return (["train", f"data.train_path={tiny / 'train'}", f"data.val_path={tiny / 'val'}",
                 "scaling.num_workers=2"], "has 1 rows for scaling.num_workers=2", None)
    if case == "resume_incompatible_override":
        return (["train", "--resume", trained["result"].run_id, f"tracking.tracking_uri={uri_of(trained)}",
                 "model.hidden_size=8"], "--resume continues the same model", None)
    raise AssertionError(case)


def uri_of(trained) -> str:
    return trained["result"].tracking_uri


CASES = list(DATA_CASES) + [
    "label_too_large", "unknown_key", "wrong_type", "bad_override_syntax", "missing_config_file",
    "too_many_workers", "unreachable_mlflow", "unreachable_ray", "resume_unknown_run",
    "unknown_model_uri", "unknown_alias", "model_n_features_differs", "output_exists",
    "predict_missing_input",
    # Outputs that would replace, delete or mix with what the user owns.
    "predict_output_is_input", "predict_output_holds_input", "predict_output_inside_input",
    "predict_overwrite_foreign", "synth_out_is_cwd", "prepare_out_holds_input",
    # Errors that came late or as tracebacks.
    "tracking_uri_unsupported", "predict_tracking_uri_unsupported", "storage_path_is_file",
    "alias_reserved", "model_name_invalid", "empty_val_path", "rows_fewer_than_workers",
    "resume_incompatible_override",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line(case, tmp_path, trained):
    args, expected, must_not_exist = build(case, tmp_path, trained)
    proc = run_cli(*args, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    print(f"{case} (exit {proc.returncode}): {lines[0] if lines else ''}")  # shown by pytest -rP
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert ":" in lines[0][len("error: "):]  # the problem, then what to do
    assert "Traceback" not in proc.stderr + proc.stdout
    if must_not_exist is not None:
        assert not must_not_exist.exists()
    if case == "output_exists":
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    # Nothing the user had was touched, and no output appeared next to it.
    if case.startswith("predict_output"):
        assert sorted(p.name for p in (tmp_path / "data" / "s").iterdir()) == ["train", "val"]
        assert sorted(p.name for p in (tmp_path / "data" / "s" / "val").iterdir()) == \
            sorted(p.name for p in (trained["data"] / "val").iterdir())
    if case == "predict_overwrite_foreign":
        assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    if case == "synth_out_is_cwd":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    if case == "prepare_out_holds_input":
        assert sorted(p.name for p in (tmp_path / "tbl").iterdir()) == ["readings.csv"]
    if case == "resume_incompatible_override":
        mlc = tracking.client(trained["result"].tracking_uri)
        assert mlc.get_run(trained["result"].run_id).info.status == "FINISHED"
    hidden = [p.name for p in tmp_path.rglob(".*partial*")]
    assert not hidden, hidden
    for store in (tmp_path / "mlflow.db", Path(trained["result"].tracking_uri[len("sqlite:///"):])):
        if store.exists():
            mlc = tracking.client(f"sqlite:///{store}")
            experiments = [e.experiment_id for e in mlc.search_experiments()]
            assert mlc.search_runs(experiments, filter_string="attributes.status = 'RUNNING'") == []
