"""The same train job against a real `mlflow server` on a free loopback port."""

import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port, run_cli, small_config
from pipeline import tracking
from pipeline.train import run_training


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("mlflow server did not start:\n" + (root / "server.log").read_text())
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_train_against_a_tracking_server(ray_session, synth_dir, tmp_path, mlflow_server):
    cfg = small_config(synth_dir, tmp_path, **{
        "tracking.tracking_uri": mlflow_server, "tracking.artifact_location": "null",
        "train.epochs": 2, "tracking.registered_model_name": "server-model"})
    res = run_training(cfg)
    mlc = tracking.client(mlflow_server)
    run = mlc.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
    assert len(mlc.get_metric_history(res.run_id, "val_accuracy")) == 2
    assert "config.yaml" in {a.path for a in mlc.list_artifacts(res.run_id)}
    mv = mlc.get_model_version_by_alias("server-model", "current")
    assert mv.run_id == res.run_id
    import mlflow.pyfunc
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/server-model@current")
    assert model.metadata.get_input_schema().input_names() == ["features"]


def test_unreachable_tracking_server_is_one_clear_line(tmp_path, synth_dir):
    port = free_port()  # nothing listens there
    proc = run_cli("train", f"data.train_path={synth_dir / 'train'}", f"data.val_path={synth_dir / 'val'}",
                   f"tracking.tracking_uri=http://127.0.0.1:{port}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and f"MLflow server at http://127.0.0.1:{port} is unreachable" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
