"""Shard discovery and validation: every bad-input class gives one clear message naming the file."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from pipeline.config import DataConfig
from pipeline.data import _split_by_hash
from pipeline.shards import list_shards, validate_train_data
from pipeline.errors import DataError

F32 = pa.list_(pa.list_(pa.float32()))


def write(path: Path, features, labels, feature_type=F32, label_type=pa.int64(), extra=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {"features": pa.array(features, type=feature_type)}
    if labels is not None:
        cols["label"] = pa.array(labels, type=label_type)
    cols.update(extra or {})
    pq.write_table(pa.table(cols), path)
    return path


def good_rows(n=6, length=3, width=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((length, width)).tolist() for _ in range(n)], [i % 2 for i in range(n)]


def make_case(root: Path, case: str) -> tuple[Path, str]:
    """Write a training directory with one defect; return (dir, text the error must contain)."""
    d = root / case
    feats, labels = good_rows()
    if case == "missing":
        return d / "nowhere", "does not exist"
    if case == "empty_dir":
        d.mkdir()
        return d, "holds no Parquet files"
    write(d / "a.parquet", feats, labels)
    if case == "not_parquet_name":
        (d / "notes.csv").write_text("a,b\n1,2\n")
        return d, "notes.csv is not a Parquet file"
    if case == "not_parquet_content":
        (d / "b.parquet").write_text("this is text, not parquet")
        return d, "b.parquet: not a readable Parquet file"
    if case == "truncated":
        data = (d / "a.parquet").read_bytes()
        (d / "b.parquet").write_bytes(data[: len(data) // 2])
        return d, "b.parquet: not a readable Parquet file"
    if case == "no_features":
        pq.write_table(pa.table({"x": [1.0], "label": [0]}), d / "b.parquet")
        return d, "b.parquet: no 'features' column"
    if case == "no_label":
        write(d / "b.parquet", feats, None)
        return d, "b.parquet: no 'label' column"
    if case == "flat_features":
        pq.write_table(pa.table({"features": pa.array([[1.0, 2.0]]), "label": [0]}), d / "b.parquet")
        return d, "expected list<list<float>>"
    if case == "string_features":
        pq.write_table(pa.table({"features": pa.array([[["a"]]]), "label": [0]}), d / "b.parquet")
        return d, "expected list<list<float>>"
    if case == "width_across_files":
        f3, l3 = good_rows(width=3)
        write(d / "b.parquet", f3, l3)
        return d, "inconsistent n_features across files"
    if case == "width_within_file":
        write(d / "b.parquet", feats[:2] + [[[1.0, 2.0], [1.0]]], [0, 1, 0])
        return d, "b.parquet: inconsistent n_features: row 2"
    if case == "nan":
        write(d / "b.parquet", feats[:3] + [[[1.0, float("nan")]]], [0, 1, 0, 1])
        return d, "b.parquet: NaN or inf feature values (first in row 3"
    if case == "inf":
        write(d / "b.parquet", [[[float("inf"), 1.0]]], [0])
        return d, "NaN or inf"
    if case == "zero_length":
        write(d / "b.parquet", feats[:1] + [[]], [0, 1])
        return d, "b.parquet: zero-length sequence in row 1"
    if case == "negative_label":
        write(d / "b.parquet", feats, [0, 1, -1, 0, 1, 0])
        return d, "b.parquet: negative label -1"
    if case == "float_label":
        write(d / "b.parquet", feats, [0.0, 1.5, 0, 1, 0, 1], label_type=pa.float64())
        return d, "b.parquet: column 'label' is double, expected integer"
    if case == "null_label":
        write(d / "b.parquet", feats, [0, None, 0, 1, 0, 1])
        return d, "b.parquet: null labels"
    raise AssertionError(case)


CASES = ["missing", "empty_dir", "not_parquet_name", "not_parquet_content", "truncated",
         "no_features", "no_label", "flat_features", "string_features", "width_across_files",
         "width_within_file", "nan", "inf", "zero_length", "negative_label", "float_label",
         "null_label"]


@pytest.mark.parametrize("case", CASES)
def test_validation_names_the_problem(tmp_path, case):
    path, expected = make_case(tmp_path, case)
    with pytest.raises(DataError) as err:
        validate_train_data(DataConfig(train_path=str(path), val_path=None, val_fraction=0.2))
    assert expected in str(err.value)


def test_labels_out_of_range_for_configured_classes(tmp_path):
    feats, _ = good_rows()
    write(tmp_path / "t" / "a.parquet", feats, [0, 1, 2, 3, 4, 5])
    with pytest.raises(DataError, match="label 5 is out of range for 3 classes"):
        validate_train_data(DataConfig(train_path=str(tmp_path / "t"), val_path=None,
                                       val_fraction=0.2, num_classes=3))


def test_every_problem_reported_at_once(tmp_path):
    d = tmp_path / "t"
    feats, labels = good_rows()
    write(d / "a.parquet", feats[:1] + [[]], [0, 1])
    write(d / "b.parquet", feats, [0, 1, -1, 0, 1, 0])
    with pytest.raises(DataError) as err:
        validate_train_data(DataConfig(train_path=str(d), val_path=None, val_fraction=0.2))
    assert len(err.value.problems) == 2


def test_valid_data_inferred_shapes_and_fixed_size_lists(tmp_path):
    feats, labels = good_rows(width=4)
    write(tmp_path / "t" / "a.parquet", feats, [0, 1, 2, 0, 1, 2],
          feature_type=pa.list_(pa.list_(pa.float32(), 4)))
    write(tmp_path / "v" / "a.parquet", feats, labels, extra={"id": pa.array(range(6))})
    info = validate_train_data(DataConfig(train_path=str(tmp_path / "t"),
                                          val_path=[str(tmp_path / "v" / "a.parquet")]))
    assert (info.n_features, info.num_classes, info.train_rows, info.val_rows) == (4, 3, 6, 6)


def test_globs_and_lists_expand_to_sorted_files(tmp_path):
    feats, labels = good_rows()
    for name in ("b.parquet", "a.parquet", "_SUCCESS", ".hidden.parquet"):
        write(tmp_path / name, feats, labels) if name.endswith("parquet") else (tmp_path / name).touch()
    assert [Path(p).name for p in list_shards(str(tmp_path))] == ["a.parquet", "b.parquet"]
    assert [Path(p).name for p in list_shards(str(tmp_path / "*.parquet"))] == ["a.parquet", "b.parquet"]
    with pytest.raises(DataError, match="matches no files"):
        list_shards(str(tmp_path / "*.pq"))


def test_hash_split_is_a_deterministic_partition():
    table = pa.table({"features": pa.array([[[float(i)]] for i in range(1000)], type=F32),
                      "row_hash": pa.array(np.arange(1000, dtype=np.uint64) * 7919)})
    val = _split_by_hash(table, 0.2, seed=3, keep_val=True)
    train = _split_by_hash(table, 0.2, seed=3, keep_val=False)
    ids = lambda t: {r[0][0] for r in t.column("features").to_pylist()}  # noqa: E731
    assert ids(val).isdisjoint(ids(train)) and len(ids(val) | ids(train)) == 1000
    assert 150 < val.num_rows < 250
    assert ids(_split_by_hash(table, 0.2, seed=3, keep_val=True)) == ids(val)
    assert ids(_split_by_hash(table, 0.2, seed=4, keep_val=True)) != ids(val)


def test_data_check_cli_summary_and_failure(tmp_path, synth_dir):
    ok = run_cli("data", "check", str(synth_dir / "train"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "rows:        1600" in ok.stdout and "n_features:  4" in ok.stdout
    assert "classes:" in ok.stdout and ok.stdout.strip().endswith("ok")
    path, expected = make_case(tmp_path, "nan")
    bad = run_cli("data", "check", str(path), cwd=tmp_path)
    assert bad.returncode == 2 and expected in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("reader", ["v1", "v2"])
def test_reads_come_in_bounded_blocks_with_the_same_row_hashes(ray_session, tmp_path, reader):
    """Blocks are cut to BLOCK_BYTES whatever the file size (a worker's memory stays flat), and
    both Ray Data readers give every row the same hash (the validation split does not move)."""
    from pipeline.data import BLOCK_BYTES, read_parquet_columns

    rng = np.random.default_rng(0)
    rows, length, width = 3000, 100, 16  # ~19 MiB of float32 in one file
    steps = pa.ListArray.from_arrays(
        pa.array(np.arange(0, rows * length * width + 1, width, dtype=np.int32)),
        pa.array(rng.standard_normal(rows * length * width, dtype=np.float32)))
    features = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * length + 1, length,
                                                           dtype=np.int32)), steps)
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"features": features, "label": pa.array(np.arange(rows) % 3),
                             "id": pa.array(np.arange(rows))}), path)
    ds = read_parquet_columns([str(path)], ["features", "id"], reader, row_hash=True)
    blocks = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    assert len(blocks) >= 2
    assert max(b.nbytes for b in blocks) <= BLOCK_BYTES * 1.1
    assert sorted(ds.columns()) == ["features", "id", "row_hash"]
    table = pa.concat_tables(blocks)
    assert table.num_rows == rows
    hashes = dict(zip(table.column("id").to_pylist(), table.column("row_hash").to_pylist()))
    other = read_parquet_columns([str(path)], ["id"], "v2" if reader == "v1" else "v1", row_hash=True)
    again = pa.concat_tables(other.iter_batches(batch_size=None, batch_format="pyarrow"))
    assert hashes == dict(zip(again.column("id").to_pylist(), again.column("row_hash").to_pylist()))
