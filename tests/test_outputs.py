"""What a command may write, replace and leave behind: the user's files are never touched.

The path rules (pipeline/storage.py) directly, then through the CLI: `--overwrite` replaces only
an output this project wrote (its manifest names every file), an output never equals, sits
inside or holds an input, and what is published appears whole.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import cli_env, run_cli
from pipeline import tracking
from pipeline.errors import OutputError
from pipeline.storage import MANIFEST, Output, check_apart, foreign_entries, relation


def test_relation_of_paths_resolves_symlinks_globs_and_uris(tmp_path, monkeypatch):
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert relation("data/x", str(tmp_path / "data" / "x")) == "equal"
    assert relation("link/x/preds", "data/x") == "inside"  # through the symlink
    assert relation("data", "link/x") == "above"
    assert relation("data/x/out", "data/x/*.parquet") == "inside"  # a glob's directory
    assert relation("data/y", "data/x") is None
    assert relation("s3://b/data", "s3://b/data/x") == "above"
    assert relation("s3://b/data", "s3://other/data") is None
    assert relation("s3://b/data", "data") is None
    with pytest.raises(OutputError, match="holds the input --input data/x"):
        check_apart({"--output data": "data"}, {"--input": ["elsewhere", "data/x"]})
    check_apart({"train.storage_path .": "."}, {"data.train_path": "data/x"}, replaces=False)


def test_overwrite_replaces_only_what_this_project_wrote(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Output("out", "test")
    with out.staged() as staging:
        Path(staging, "part.txt").write_text("1")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["written_by"] == "lstm-pipeline" and manifest["files"] == ["part.txt"]
    assert foreign_entries(str(tmp_path / "out")) == []
    with pytest.raises(OutputError, match="already exists: pass --overwrite"):
        Output("out", "test")
    again = Output("out", "test", overwrite=True)
    with again.staged() as staging:
        Path(staging, "other.txt").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST, "other.txt"]
    (tmp_path / "out" / "notes.md").write_text("the user's")
    with pytest.raises(OutputError, match="holds notes.md, which lstm-pipeline did not write"):
        Output("out", "test", overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    with pytest.raises(OutputError, match="no lstm-pipeline manifest"):
        Output("mine", "test", overwrite=True)
    # A failed write leaves the old output as it was and no staging directory.
    (tmp_path / "out" / "notes.md").unlink()
    with pytest.raises(RuntimeError):
        with Output("out", "test", overwrite=True).staged() as staging:
            Path(staging, "half.txt").write_text("x")
            raise RuntimeError("crash")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST, "other.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_synth_overwrites_its_own_output_but_not_a_project_directory(tmp_path):
    small = ["--rows", "20", "--val-rows", "5"]
    assert run_cli("data", "synth", "--out", "d", *small, cwd=tmp_path).returncode == 0
    again = run_cli("data", "synth", "--out", "d", "--overwrite", "--rows", "30", "--val-rows", "5",
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert pq.read_table(tmp_path / "d" / "train").num_rows == 30
    project = tmp_path / "project"
    (project / "notes").mkdir(parents=True)
    (project / "notes" / "plan.md").write_text("mine")
    (project / "mlflow.db").write_text("a database")
    for out in (".", str(project)):
        proc = run_cli("data", "synth", "--out", out, "--overwrite", *small, cwd=project)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in project.iterdir()) == ["mlflow.db", "notes"]
    assert (project / "notes" / "plan.md").read_text() == "mine"


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.2)


def test_a_killed_predict_is_continued_in_the_same_run(ray_session, trained, tmp_path):
    """kill -9 of a predict job leaves its run RUNNING; the rerun that resumes the job's chunks
    continues that run and ends it FINISHED, with no second run."""
    src = trained["data"] / "val"
    (tmp_path / "in").mkdir()
    for i, f in enumerate(sorted(src.iterdir()) * 2):
        (tmp_path / "in" / f"part-{i}.parquet").write_bytes(f.read_bytes())
    uri = trained["result"].tracking_uri
    args = ["predict", "--model", "models:/lstm-classifier@current", "--input", "in",
            "--output", "out", "predict.chunk_bytes=1", "tracking.experiment=killed-predict",
            f"tracking.tracking_uri={uri}"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=cli_env(), start_new_session=True)
    _wait_for(lambda: list(tmp_path.glob(".out.partial-*/chunk-00000/_DONE.json")), 240,
              "the first chunk never finished")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    mlc = tracking.client(uri)
    exp = mlc.get_experiment_by_name("killed-predict").experiment_id
    [stale] = mlc.search_runs([exp])
    assert stale.info.status == "RUNNING"
    done = run_cli(*args, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "continuing the interrupted run" in done.stdout and "resumed: " in done.stdout
    assert done.stderr.strip() == ""  # a clean run prints no error lines (no Ray C++ warnings)
    [run] = mlc.search_runs([exp])
    assert run.info.run_id == stale.info.run_id and run.info.status == "FINISHED"
    assert run.data.metrics["rows"] == 800
    assert pq.read_table(tmp_path / "out").num_rows == 800
    assert not list((tmp_path / "out").rglob("_RUN.json"))
