"""Shared fixtures: one local Ray per session, small real Parquet data, one trained model.

Everything is real and small: a local Ray with 4 logical CPUs (2 training workers plus room for
Ray Data's read tasks on a 2-core machine), SQLite MLflow stores under tmp_path, Parquet written
by the tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[1]
SECRET = "hunter2-not-for-logs"
"""A credential the trained fixture is given; tests check it is recorded nowhere."""
SMALL = dict(rows=1600, val_rows=400, n_features=4, num_classes=3, min_length=4, max_length=14,
             shards=2, seed=7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(extra: dict | None = None) -> dict:
    """The environment for a CLI subprocess: ours, minus the MLflow URIs that in-process jobs
    exported (mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI for child processes)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    return env | {"PYTHONUNBUFFERED": "1"} | (extra or {})


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `lstm-pipeline ARGS` as a user would, in a subprocess."""
    full_env = cli_env(env)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def ray_session():
    import logging

    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-t-", dir="/tmp")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from pipeline.synth import SynthSpec, write_synthetic

    out = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic(str(out), SynthSpec(**SMALL))
    return out


def small_config(data_dir: Path, store: Path, **over):
    """A fast training config over the small synthetic data, tracked in `store`."""
    from pipeline.config import TrainJobConfig, load_config

    overrides = [
        f"data.train_path={data_dir / 'train'}",
        f"data.val_path={data_dir / 'val'}",
        "data.batch_size=64",
        "model.hidden_size=32",
        "train.epochs=4",
        "train.lr=0.01",
        "train.log_every_n_steps=5",
        f"train.storage_path={store / 'ray_results'}",
        "scaling.num_workers=2",
        f"tracking.tracking_uri=sqlite:///{store / 'mlflow.db'}",
        f"tracking.artifact_location={store / 'artifacts'}",
        "tracking.experiment=tests",
    ] + [f"{k}={v}" for k, v in over.items()]
    return load_config(TrainJobConfig, None, overrides)


@pytest.fixture(scope="session")
def trained(ray_session, synth_dir, tmp_path_factory):
    """One real 2-worker training run, shared by the tests that inspect its outcome."""
    from pipeline.train import run_training

    store = tmp_path_factory.mktemp("store")
    # Samples system metrics every second, so this short run has some. The Ray address (unused:
    # the session's Ray is running) and the command carry credentials that must not be recorded.
    cfg = small_config(synth_dir, store, **{"tracking.system_metrics_interval": 1,
                                            "scaling.address": f"ray://ci:{SECRET}@head:10001"})
    result = run_training(cfg, command="pytest trained fixture "
                                       f"tracking.tracking_uri=https://ci:{SECRET}@mlflow.example")
    return {"result": result, "cfg": cfg, "store": store, "data": synth_dir}
