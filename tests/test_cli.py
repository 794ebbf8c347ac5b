"""The launchers as a user runs them: subprocesses, real output, exit codes."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, cli_env, run_cli
from pipeline import tracking


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["predict", "--help"], ["data", "synth", "--help"],
                                  ["data", "check", "--help"], ["ui", "--help"]])
def test_help_documents_every_command(args, tmp_path):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0 and "Usage:" in proc.stdout


@pytest.mark.parametrize("module", ["jobs.train", "jobs.predict", "jobs.data", "jobs.ui", "jobs.cli"])
def test_each_launcher_runs_as_a_module(module, tmp_path):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "Usage:" in proc.stdout, proc.stderr


def test_synth_refuses_to_overwrite(tmp_path):
    first = run_cli("data", "synth", "--out", "d", "--rows", "20", "--val-rows", "5", cwd=tmp_path)
    assert first.returncode == 0 and "wrote 20 training and 5 validation" in first.stdout
    again = run_cli("data", "synth", "--out", "d", "--rows", "20", cwd=tmp_path)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    assert sorted(os.listdir(tmp_path / "d")) == ["train", "val"]


def test_several_config_errors_are_one_line_each_in_order(tmp_path):
    proc = run_cli("train", "model.hidden_sise=3", "train.lr=fast", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key model.hidden_sise: check the spelling (known: bidirectional, "
        "dropout, hidden_size, num_layers, task)",
        "error: train.lr must be a number, got 'fast': fix it in the config file or the key=value override",
    ]


def _train_args(synth_dir, *extra):
    return ["train", f"data.train_path={synth_dir / 'train'}", f"data.val_path={synth_dir / 'val'}",
            "data.batch_size=64", "model.hidden_size=32", "train.lr=0.01", *extra]


def test_ctrl_c_marks_the_run_killed(tmp_path, synth_dir):
    """Ctrl-C here; SIGTERM (`lstm-pipeline jobs stop`) is covered by the cluster tests."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *_train_args(synth_dir, "train.epochs=50")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env())
    run_id = None
    deadline = time.time() + 300
    for line in proc.stdout:
        if line.startswith("mlflow: run "):
            run_id = line.split()[2]
        if line.startswith("epoch 1/50"):
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    run = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "KILLED"
