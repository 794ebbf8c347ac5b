"""Training survives a dead worker, resumes a killed job, stops early, and refuses NaNs."""

import os
import signal
import subprocess
import sys
import threading
import time

import mlflow  # noqa: F401  (imported before the threads: concurrent first imports of mlflow race)
import psutil
import pytest
import torch

from conftest import cli_env, run_cli, small_config
from pipeline import tracking
from pipeline.errors import PipelineError
from pipeline.checkpoints import config_for_resume, resume_checkpoint
from pipeline.train import run_training


def _history(mlc, run_id, key):
    return sorted((m.step, m.value) for m in mlc.get_metric_history(run_id, key))


def _our_train_workers() -> list[psutil.Process]:
    """RayTrainWorker processes of this test session's Ray (children of its raylet), not of any
    other Ray on the machine."""
    import ray

    raylet_pid = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    return [p for p in psutil.Process(raylet_pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


def test_a_killed_worker_restarts_from_the_checkpoint_in_the_same_run(ray_session, synth_dir, tmp_path):
    cfg = small_config(synth_dir, tmp_path, **{"train.epochs": 4, "train.max_failures": 1,
                                               "tracking.registered_model_name": "null"})
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    outcome = {}

    def train():
        try:
            outcome["result"] = run_training(cfg, console=lambda line: None)
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    # Wait until epoch 1 is reported (its checkpoint exists), then kill a worker mid-epoch 2.
    deadline = time.time() + 300
    killed = None
    while killed is None and time.time() < deadline and thread.is_alive():
        exp = tracking.client(uri).get_experiment_by_name("tests")
        runs = tracking.client(uri).search_runs([exp.experiment_id]) if exp else []
        if runs and tracking.client(uri).get_metric_history(runs[0].info.run_id, "val_loss"):
            time.sleep(1.0)
            workers = _our_train_workers()
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.3)
    thread.join(timeout=600)
    assert killed is not None, "never saw epoch 1 finish"
    assert "error" not in outcome, outcome.get("error")
    res = outcome["result"]
    mlc = tracking.client(uri)
    runs = mlc.search_runs([mlc.get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_id for r in runs] == [res.run_id]  # one run, continued
    assert runs[0].info.status == "FINISHED"
    for key in ("val_loss", "val_accuracy", "train_loss"):
        assert [s for s, _ in _history(mlc, res.run_id, key)] == [1, 2, 3, 4], key
    steps = [s for s, _ in _history(mlc, res.run_id, "train_loss_step")]
    assert steps == sorted(set(steps)), "a redone step was logged twice"
    assert steps == list(range(5, steps[-1] + 1, 5)), "a gap in the step history"
    assert res.val_accuracy >= 0.8  # the same band as the undisturbed run in test_train


def test_kill_the_driver_then_resume_into_the_same_run(synth_dir, tmp_path):
    """Also the CLI end to end on the embedded defaults: SQLite store, artifacts and checkpoints
    in the working directory, the summary a user reads."""
    args = ["train", f"data.train_path={synth_dir / 'train'}", f"data.val_path={synth_dir / 'val'}",
            "data.batch_size=64", "model.hidden_size=32", "train.lr=0.01"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args, "train.epochs=3"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=cli_env(), start_new_session=True)
    run_id = None
    for line in proc.stdout:
        if line.startswith("mlflow: run "):
            run_id = line.split()[2]
        if line.startswith("epoch 1/3"):
            break
    # Ray records a checkpoint in the snapshot just after the report that printed the line; wait
    # for it so this test takes the usual path (the other one is checked at the end).
    snapshot = next(iter((tmp_path / "ray_results").glob("*/checkpoint_manager_snapshot.json")), None)
    deadline = time.time() + 60
    while snapshot is None and time.time() < deadline:
        time.sleep(0.2)
        snapshot = next(iter((tmp_path / "ray_results").glob("*/checkpoint_manager_snapshot.json")), None)
    assert snapshot is not None
    # A crash, not a shutdown: the whole process group (driver and the Ray it started) dies.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    mlc = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlc.get_run(run_id).info.status == "RUNNING"  # nobody could close it
    done = run_cli("train", "--resume", run_id, "train.epochs=4", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # The console is ours: no Ray Data INFO chatter (plans, parquet sampling, progress notices).
    chatter = [line for line in done.stderr.splitlines() if "\tINFO " in line or "\tWARNING " in line]
    assert not chatter, chatter
    out = done.stdout
    assert "(resumed)" in out and "epoch 4/4" in out and "seq/s" in out and "ETA" in out
    assert "epoch 1/4" not in out  # continued from the checkpoint, not from scratch
    assert f"run id:          {run_id}" in out
    assert "registered:      models:/lstm-classifier/1 (alias @current)" in out
    assert "open the UI:     lstm-pipeline ui" in out
    assert (tmp_path / "mlartifacts").is_dir() and (tmp_path / "ray_results").is_dir()
    run = mlc.get_run(run_id)
    assert run.info.status == "FINISHED" and "--resume" in run.data.tags["resumed_with"]
    assert [s for s, _ in _history(mlc, run_id, "val_loss")] == [1, 2, 3, 4]
    assert len(mlc.search_runs([run.info.experiment_id])) == 1

    # A crash between a checkpoint's upload and its snapshot entry: resume from the newest
    # checkpoint that loads, skipping a half-written one, and refuse when none is left.
    cfg, _ = config_for_resume(run_id, [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                        f"train.storage_path={tmp_path / 'ray_results'}"])
    assert resume_checkpoint(cfg, run_id) is None  # the snapshot is there: Ray restores by itself
    snapshot.unlink()
    saved = sorted(snapshot.parent.glob("checkpoint_*/checkpoint.pt"))
    assert len(saved) >= 2
    newest = max(saved, key=lambda p: torch.load(p, weights_only=True)["epoch"])
    assert resume_checkpoint(cfg, run_id) == str(newest.parent)
    newest.write_bytes(newest.read_bytes()[:100])
    assert resume_checkpoint(cfg, run_id) not in (None, str(newest.parent))
    for p in saved:
        p.unlink()
    with pytest.raises(PipelineError, match="has no checkpoint under"):
        resume_checkpoint(cfg, run_id)


def test_resuming_a_run_with_nothing_left_to_train_changes_nothing(trained, tmp_path):
    res = trained["result"]
    mlc = tracking.client(res.tracking_uri)
    before = mlc.get_run(res.run_id)
    versions = sorted(v.version for v in mlc.search_model_versions("name='lstm-classifier'"))
    current = mlc.get_model_version_by_alias("lstm-classifier", "current").version
    proc = run_cli("train", "--resume", res.run_id, f"tracking.tracking_uri={res.tracking_uri}",
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run {res.run_id} has trained 4 of train.epochs=4 epochs: nothing to do" in proc.stdout
    after = mlc.get_run(res.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time)
    assert sorted(v.version for v in mlc.search_model_versions("name='lstm-classifier'")) == versions
    assert mlc.get_model_version_by_alias("lstm-classifier", "current").version == current


def test_resume_errors_are_one_line(tmp_path, synth_dir):
    proc = run_cli("train", "--resume", "0123456789abcdef", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot resume run 0123456789abcdef" in lines[0]


def test_early_stopping_stops_when_the_metric_stalls(ray_session, synth_dir, tmp_path):
    # A learning rate this small leaves the predictions, so the accuracy, unchanged.
    cfg = small_config(synth_dir, tmp_path, **{
        "train.epochs": 6, "train.lr": 1e-12, "scaling.num_workers": 1,
        "train.early_stopping_patience": 2, "train.early_stopping_metric": "val_accuracy",
        "tracking.registered_model_name": "null",
        # Also: system metrics switched off (sampled often enough that they would show).
        "tracking.system_metrics": "false", "tracking.system_metrics_interval": 0.5})
    res = run_training(cfg, console=lambda line: None)
    mlc = tracking.client(res.tracking_uri)
    assert [s for s, _ in _history(mlc, res.run_id, "val_accuracy")] == [1, 2, 3]
    assert not any(k.startswith("system/") for k in mlc.get_run(res.run_id).data.metrics)


def test_a_non_finite_loss_stops_training_naming_epoch_and_step():
    """The guard in the training step, on a model whose weights went bad (as after divergence)."""
    import torch

    from pipeline.model import LSTMClassifier
    from pipeline.errors import NonFiniteLoss
    from pipeline.worker import train_epoch

    torch.manual_seed(0)
    model = LSTMClassifier(4, 3, hidden_size=8)
    opt = torch.optim.Adam(model.parameters())
    batch = {"x": torch.randn(5, 6, 4), "lengths": torch.tensor([6, 5, 4, 3, 2]),
             "label": torch.tensor([0, 1, 2, 0, 1])}
    logged = []
    loss, seen, step = train_epoch(model, opt, [batch, batch], "cpu", 1.0,
                                   lambda s, v: logged.append(s), step=10, epoch=2)
    assert (seen, step, logged) == (10, 12, [11, 12]) and loss > 0
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    before = [p.detach().clone() for p in model.lstm.parameters()]
    with pytest.raises(NonFiniteLoss) as err:
        train_epoch(model, opt, [batch], "cpu", 1.0, lambda s, v: None, step=12, epoch=2)
    assert "the training loss became nan in epoch 3 at step 13" in str(err.value)
    # Stopped before the step: the NaN never reached the weights.
    assert all(torch.equal(a, b) for a, b in zip(before, model.lstm.parameters()))
