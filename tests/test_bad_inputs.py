"""The bad-input matrix: each malformed input through the real CLI in a subprocess.

Every case must: exit non-zero; print exactly one `error: ...` line on stderr naming the problem
(file, row, key or URI) and what to do; print no traceback; leave no MLflow run RUNNING; write
no partial output.
"""

from pathlib import Path

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
    raise AssertionError(case)


CASES = list(DATA_CASES) + [
    "label_too_large", "unknown_key", "wrong_type", "bad_override_syntax", "missing_config_file",
    "too_many_workers", "unreachable_mlflow", "unreachable_ray", "resume_unknown_run",
    "unknown_model_uri", "unknown_alias", "model_n_features_differs", "output_exists",
    "predict_missing_input",
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
    for store in (tmp_path / "mlflow.db", Path(trained["result"].tracking_uri[len("sqlite:///"):])):
        if store.exists():
            mlc = tracking.client(f"sqlite:///{store}")
            experiments = [e.experiment_id for e in mlc.search_experiments()]
            assert mlc.search_runs(experiments, filter_string="attributes.status = 'RUNNING'") == []


def test_the_matrix_has_at_least_20_cases():
    assert len(CASES) >= 20
