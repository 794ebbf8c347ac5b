"""The launchers as a user runs them: subprocesses, real output, exit codes."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env, free_port, run_cli
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
    assert sorted(os.listdir(tmp_path / "d")) == ["_lstm_pipeline.json", "train", "val"]


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


def _session_processes(sid: int) -> list[int]:
    """Live processes of a process session (the CLI and the Ray it started)."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                found.append(int(p.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def stop_at(args: list[str], cwd: Path, trigger: str, delay: float, sig: int) -> tuple[subprocess.Popen, str | None, str]:
    """Run the CLI, send `sig` `delay` seconds after a stdout line starting with `trigger`."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), start_new_session=True)
    run_id = None
    deadline = time.time() + 300
    for line in proc.stdout:
        if line.startswith("mlflow: run "):
            run_id = line.split()[2]
        if line.startswith(trigger):
            break
        assert time.time() < deadline
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, run_id, err


# Ctrl-C and SIGTERM (`jobs stop`, a Kubernetes pod stop) at different moments of a run: while
# the local Ray starts, while it trains, and after the last epoch (the model is being logged).
STOP_MOMENTS = [("SIGTERM", "mlflow: run ", 2.0), ("SIGINT", "epoch 1/3", 0.0),
                ("SIGTERM", "epoch 3/3", 0.5)]


@pytest.mark.parametrize("sig, trigger, delay", STOP_MOMENTS)
def test_a_stop_at_any_moment_ends_the_run_killed(tmp_path, synth_dir, sig, trigger, delay):
    args = _train_args(synth_dir, "train.epochs=3", "tracking.registered_model_name=stopped")
    proc, run_id, err = stop_at(args, tmp_path, trigger, delay, getattr(signal, sig))
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    run = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "KILLED"
    time.sleep(10)
    assert _session_processes(proc.pid) == []  # no Ray process of ours is left


def test_a_stopped_predict_ends_killed_and_publishes_nothing(tmp_path, trained):
    src = trained["data"] / "val"
    (tmp_path / "in").mkdir()
    for i, f in enumerate(sorted(src.iterdir()) * 3):
        (tmp_path / "in" / f"part-{i}.parquet").write_bytes(f.read_bytes())
    args = ["predict", "--model", "models:/lstm-classifier@current", "--input", "in", "--output",
            "out", "predict.chunk_bytes=1", f"tracking.tracking_uri={trained['result'].tracking_uri}",
            "tracking.experiment=stopped-predict"]
    proc, run_id, err = stop_at(args, tmp_path, "model: ", 12.0, signal.SIGTERM)  # mid-chunks
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    assert tracking.client(trained["result"].tracking_uri).get_run(run_id).info.status == "KILLED"
    assert not (tmp_path / "out").exists()
    time.sleep(10)
    assert _session_processes(proc.pid) == []


def test_ui_refuses_a_port_in_use_at_once(tmp_path, trained):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("ui", "--tracking-uri", trained["result"].tracking_uri, "--port", str(port),
                       cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use): another server "
        f"(another `lstm-pipeline ui`?) uses it; pass a free --port, e.g. --port {port + 1}"]


def test_ui_over_a_store_mlflow_cannot_open_is_one_line(tmp_path):
    proc = run_cli("ui", "--tracking-uri", "foo://bar", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: --tracking-uri foo://bar is not a store MLflow can use")
    assert "already a tracking server" not in line


def test_ui_on_every_interface_names_its_addresses_and_warns(tmp_path, trained):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "ui", "--host", "0.0.0.0", "--port",
                             str(port), "--tracking-uri", trained["result"].tracking_uri],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=cli_env(), start_new_session=True)
    try:
        first, second = proc.stderr.readline(), proc.stderr.readline()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert f"at http://127.0.0.1:{port} (listening on 0.0.0.0, every interface" in first
    assert "localhost" not in first
    assert second.startswith("warning: --host 0.0.0.0 exposes the MLflow UI, which has no "
                             "authentication")
