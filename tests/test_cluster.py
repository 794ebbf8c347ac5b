"""`lstm-pipeline submit` / `jobs` against a real two-node Ray cluster on this machine.

The cluster: `ray start --head --block` and `ray start --address HEAD --block`, each in its own
process session with its own free ports, temp dir, CPUs and custom resource, both requiring a
token (RAY_AUTH_MODE=token), plus a real `mlflow server` on a free loopback port. The jobs run
the real `python -m jobs.<stage>` there. Nothing here calls ray.init or uses `ray stop`: another
Ray may run on this machine, so teardown kills exactly the processes these nodes started.

The pure helpers of jobs/submit.py and pipeline/train.py are tested first, without a cluster.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, free_port
from pipeline.remote import (EXCLUDES, build_entrypoint, build_runtime_env, check_no_secrets,
                             failure_summary, plaintext_remote, relative_path_warnings,
                             resolve_address, resolve_auth_token)
from pipeline.config import TrainJobConfig, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.remote import shared_path_warnings as check_shared_paths

BIN = Path(sys.executable).parent
SUBMIT_TIMEOUT = 240


# --------------------------------------------------------------------------- pure helpers


def test_address_flag_beats_the_environment():
    env = {"RAY_API_SERVER_ADDRESS": "http://api:8265", "RAY_ADDRESS": "http://ray:8265"}
    assert resolve_address("http://flag:8265/", env) == "http://flag:8265"
    assert resolve_address(None, env) == "http://api:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://ray:8265"}) == "http://ray:8265"
    assert resolve_address(None, {}) == "http://127.0.0.1:8265"
    assert resolve_address("head:8265", {}) == "http://head:8265"
    for wrong in ("ray://head:10001", "auto"):
        with pytest.raises(ConfigError, match="not the Ray dashboard's URL"):
            resolve_address(None, {"RAY_ADDRESS": wrong})


def test_auth_token_follows_rays_precedence(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-file\n")
    token_file = tmp_path / "tok"
    token_file.write_text("from-path\n")
    assert resolve_auth_token({"RAY_AUTH_TOKEN": "env", "RAY_AUTH_TOKEN_PATH": str(token_file)}, home)[0] == "env"
    assert resolve_auth_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home)[0] == "from-path"
    assert resolve_auth_token({"RAY_AUTH_MODE": "token"}, home)[0] == "from-file"
    # Without token mode the local cluster's default token file is not sent to other addresses.
    assert resolve_auth_token({}, home)[0] is None
    assert resolve_auth_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}, home)[0] is None
    with pytest.raises(PipelineError, match="RAY_AUTH_TOKEN_PATH"):
        resolve_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)
    with pytest.raises(PipelineError, match="RAY_AUTH_MODE=token but no token"):
        resolve_auth_token({"RAY_AUTH_MODE": "token"}, tmp_path / "nohome")


def test_entrypoint_and_runtime_env():
    assert build_entrypoint("train", ["-c", "conf/train.yaml", "data.train_path=s3://b/my data"]) == \
        "python -m jobs.train -c conf/train.yaml 'data.train_path=s3://b/my data'"
    assert build_entrypoint("predict", ["--model", "models:/m@current"]) == \
        "python -m jobs.predict --model models:/m@current"
    with pytest.raises(ConfigError, match="unknown stage"):
        build_entrypoint("evaluate", [])
    # No secret goes into the job's metadata: MLflow's credentials stay in this shell.
    env = build_runtime_env(REPO, {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_TOKEN": "t",
                                   "MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p",
                                   "AWS_SECRET_ACCESS_KEY": "never", "RAY_AUTH_TOKEN": "never"})
    assert env["working_dir"] == str(REPO)
    commit = env["env_vars"].pop("LSTM_PIPELINE_GIT_COMMIT", None)
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000",
                               "PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": "30"}
    if (REPO / ".git").exists():  # the job records the submitting checkout's commit
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert commit is not None and commit.startswith(head)
    for pattern in ("/data/", "/mlruns/", "/mlartifacts/", "/ray_results/", "/.venv/", "*.db"):
        assert pattern in EXCLUDES


def test_package_leaves_out_data_runs_and_venvs(tmp_path):
    """What Ray would upload as the working_dir, with our excludes, over a project with clutter."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = tmp_path / "proj"
    for rel in ("pyproject.toml", "jobs/train.py", "pipeline/data.py", "conf/train.yaml",
                "data/synth/train/part-0.parquet", "mlruns/0/meta.yaml", "mlartifacts/1/model.pt",
                "ray_results/x/checkpoint.pt", ".venv/bin/python", "mlflow.db",
                "pipeline/__pycache__/data.cpython-311.pyc", "predictions/part-0.parquet"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    shipped: list[str] = []
    _dir_travel(root, [_get_excludes(root, EXCLUDES)],
                lambda p: shipped.append(str(p.relative_to(root))) if p.is_file() else None,
                include_gitignore=False)
    assert sorted(shipped) == ["conf/train.yaml", "jobs/train.py", "pipeline/data.py", "pyproject.toml"]


def test_credentials_in_the_job_command_or_uri_are_refused():
    check_no_secrets("python -m jobs.train data.train_path=s3://b/t", {"MLFLOW_TRACKING_URI": "http://m:5000"})
    with pytest.raises(ConfigError, match=r"MLFLOW_TRACKING_URI=http://ci:\*\*\*@m:5000 carries a credential"):
        check_no_secrets("python -m jobs.train", {"MLFLOW_TRACKING_URI": "http://ci:pw@m:5000"})
    with pytest.raises(ConfigError, match=r"tracking_uri=https://\*\*\*@m/` carries a credential") as err:
        check_no_secrets("python -m jobs.train tracking.tracking_uri=https://tok123@m/", {})
    assert "tok123" not in str(err.value)


def test_a_token_over_plain_http_is_warned_about():
    assert plaintext_remote("http://10.1.2.3:8265") and plaintext_remote("http://head:8265")
    assert not plaintext_remote("https://head:8265")
    assert not plaintext_remote("http://127.0.0.1:8265") and not plaintext_remote("http://localhost:8265")
    assert not plaintext_remote("http://[::1]:8265")


def test_package_leaves_out_secrets_and_what_gitignore_ignores(tmp_path):
    """The zip Ray would upload as the working_dir (Ray's own packaging, .gitignore honoured as
    submit makes sure it is), over a project with secrets lying around."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    root = tmp_path / "proj"
    shipped_files = ["pyproject.toml", "jobs/train.py", "pipeline/data.py", "conf/train.yaml", ".gitignore"]
    secret_files = [".env", ".env.prod", "secrets.yaml", "conf/db-secret.yaml", "key.pem", "tls.key",
                    "id_rsa", ".netrc", ".aws/credentials", "gcp-credentials.json", "scratch/notes.md",
                    "big.ckpt"]
    for rel in shipped_files + secret_files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / ".gitignore").write_text("scratch/\n*.ckpt\n")
    create_package(str(root), tmp_path / "pkg.zip", include_gitignore=True, excludes=list(EXCLUDES))
    names = [n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")]
    assert sorted(names) == sorted(shipped_files)


def test_failure_summary_picks_the_jobs_error_line():
    message = ("Job entrypoint command failed with exit code 2, last available logs (truncated to "
               "20,000 chars):\nRunning entrypoint for job x: python -m jobs.train\n"
               "error: data.train_path: /nope does not exist\n")
    assert failure_summary(message) == \
        "data.train_path: /nope does not exist (Job entrypoint command failed with exit code 2)"
    crash = "Job entrypoint command failed with exit code 1, last available logs:\nTraceback\nValueError: boom\n"
    assert failure_summary(crash) == "ValueError: boom (Job entrypoint command failed with exit code 1)"
    assert failure_summary("Job was intentionally stopped.") == "Job was intentionally stopped."
    assert "jobs logs" in failure_summary(None)


def test_relative_paths_and_local_tracking_are_warned():
    warnings = relative_path_warnings({"data.train_path": ["s3://b/t", "data/t"], "train.storage_path": "/nfs/r"},
                                      "sqlite:///mlflow.db")
    assert len(warnings) == 2
    assert warnings[0].startswith("data.train_path=data/t is relative")
    assert "sqlite:///mlflow.db is a local file" in warnings[1]
    assert relative_path_warnings({"data.train_path": "gs://b/t"}, "http://mlflow:5000") == []
    assert "MLFLOW_TRACKING_URI is not set" in relative_path_warnings({}, None)[0]


def test_shared_paths_warn_only_on_multi_node_clusters():
    cfg = load_config(TrainJobConfig, None, [
        "data.train_path=[s3://bucket/train, /local/train]", "data.val_path=gs://bucket/val",
        "train.storage_path=/local/ray_results", "tracking.tracking_uri=sqlite:////local/mlflow.db",
        "tracking.artifact_location=/local/artifacts"])
    assert check_shared_paths(cfg, num_nodes=1) == []
    warnings = check_shared_paths(cfg, num_nodes=3)
    assert [w.split(" ")[0] for w in warnings] == [
        "data.train_path=/local/train", "train.storage_path=/local/ray_results",
        "tracking.tracking_uri=sqlite:////local/mlflow.db", "tracking.artifact_location=/local/artifacts"]
    assert all("3 nodes" in w and "s3://" in w and "NFS" in w for w in warnings)
    shared = load_config(TrainJobConfig, None, [
        "data.train_path=s3://b/t", "data.val_path=s3://b/v", "train.storage_path=s3://b/ckpt",
        "tracking.tracking_uri=http://mlflow:5000"])
    assert check_shared_paths(shared, num_nodes=3) == []


# --------------------------------------------------------------------------- the cluster


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held together while picking, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_range(size: int) -> int:
    """First port of `size` consecutive free ports, for Ray's worker port range."""
    for _ in range(200):
        base = secrets.randbelow(20000) + 20000
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, session id, start time) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _owned_processes(root: int) -> dict[int, int]:
    """pid -> start time of every process in root's session or below it (job drivers start their
    own sessions, so both relations are needed)."""
    stats = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit()
             if (s := _proc_stat(int(p.name))) is not None}
    owned = {pid for pid, (_, sid, _) in stats.items() if sid == root} | {root}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in stats.items() if ppid in owned} - owned
        owned |= children
        grew = bool(children)
    return {pid: stats[pid][2] for pid in owned if pid in stats}


class Node:
    """One `ray start --block` in its own session; stop() kills only what it started."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env,
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_started(self, timeout: float = 150) -> None:
        deadline = time.time() + timeout
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"ray start failed:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        owned = _owned_processes(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ray start --block then stops its processes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        owned |= {pid: st for pid, st in _owned_processes(self.proc.pid).items() if pid != self.proc.pid}
        for pid, started in owned.items():
            stat = _proc_stat(pid)
            if stat is not None and stat[2] == started:  # the same process, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout=10)


def _start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (2 CPUs, resource head_node) + worker (2 CPUs, resource worker_node), token auth on,
    and an mlflow server; yields the addresses and the token."""
    from ray._private.utils import get_dashboard_dependency_error

    if (missing := get_dashboard_dependency_error()) is not None:
        pytest.skip(f"the Ray Jobs API runs in the dashboard, which needs ray[default] ({missing}): "
                    "pip install 'ray[default]'")
    work = tmp_path_factory.mktemp("cluster")
    token = secrets.token_hex(32)
    # Ray's socket paths must stay under 107 characters: keep the temp dirs short.
    head_tmp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
    worker_tmp = tempfile.mkdtemp(prefix="rw-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))} | {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        # The job's `python` must be this interpreter, with the project installed.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    (gcs, dashboard, client, nm, om, agent, agent_grpc, metrics, rt_env,
     w_nm, w_om, w_agent, w_agent_grpc, w_metrics, w_rt_env) = _free_ports(15)
    head_workers = _free_port_range(60)
    head = Node(["--head", "--port", str(gcs), "--dashboard-port", str(dashboard),
                 "--dashboard-host", "127.0.0.1", "--include-dashboard=true",
                 "--ray-client-server-port", str(client), "--node-manager-port", str(nm),
                 "--object-manager-port", str(om), "--dashboard-agent-listen-port", str(agent),
                 "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
                 "--runtime-env-agent-port", str(rt_env), "--min-worker-port", str(head_workers),
                 "--max-worker-port", str(head_workers + 59), "--temp-dir", head_tmp,
                 "--num-cpus", "2", "--resources", '{"head_node": 1}',
                 "--object-store-memory", str(150 * 1024**2), "--disable-usage-stats"],
                env, work / "head.log")
    mlflow_proc, mlflow_url = _start_mlflow_server(work)
    nodes = [head]
    try:
        head.wait_started()
        worker_workers = _free_port_range(60)
        worker = Node(["--address", f"127.0.0.1:{gcs}", "--node-manager-port", str(w_nm),
                       "--object-manager-port", str(w_om), "--dashboard-agent-listen-port", str(w_agent),
                       "--dashboard-agent-grpc-port", str(w_agent_grpc),
                       "--metrics-export-port", str(w_metrics), "--runtime-env-agent-port", str(w_rt_env),
                       "--min-worker-port", str(worker_workers), "--max-worker-port", str(worker_workers + 59),
                       "--temp-dir", worker_tmp, "--num-cpus", "2", "--resources", '{"worker_node": 1}',
                       "--object-store-memory", str(150 * 1024**2), "--disable-usage-stats"],
                      env, work / "worker.log")
        nodes.insert(0, worker)  # stopped first
        worker.wait_started()
        _wait_http(mlflow_url + "/health", mlflow_proc, work / "server.log")
        yield {"address": f"http://127.0.0.1:{dashboard}", "token": token, "mlflow": mlflow_url,
               "work": work}
    finally:
        for node in nodes:
            node.stop()
        mlflow_proc.terminate()
        try:
            mlflow_proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(mlflow_proc.pid, signal.SIGKILL)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)


def cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = SUBMIT_TIMEOUT):
    """`lstm-pipeline ARGS` in a clean environment: no Ray or MLflow variables but `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd,
                          env=clean | {"PYTHONUNBUFFERED": "1"} | env,
                          capture_output=True, text=True, timeout=timeout)


def train_args(data: Path, store: Path, **over: str) -> list[str]:
    """A small 2-worker job, one worker per node (STRICT_SPREAD), absolute shared paths."""
    args = {"data.train_path": str(data / "train"), "data.val_path": str(data / "val"),
            "data.batch_size": "64", "model.hidden_size": "32", "train.epochs": "2",
            "train.lr": "0.01", "train.log_every_n_steps": "5",
            "train.storage_path": str(store / "ray_results"), "scaling.num_workers": "2",
            "scaling.placement_strategy": "STRICT_SPREAD", "tracking.experiment": "cluster",
            "tracking.registered_model_name": "cluster-model"} | over
    return [f"{k}={v}" for k, v in args.items()]


def client_env(cluster) -> dict[str, str]:
    # Only RAY_AUTH_TOKEN, no RAY_AUTH_MODE: submit sends an explicitly set token itself.
    return {"RAY_AUTH_TOKEN": cluster["token"], "MLFLOW_TRACKING_URI": cluster["mlflow"]}


@pytest.fixture(scope="module")
def trained_on_cluster(cluster, synth_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("cluster-store")
    proc = cli("submit", "--address", cluster["address"], "--follow", "--", "train",
               *train_args(synth_dir, store, **{"tracking.run_name": "cluster-train"}),
               env=client_env(cluster), cwd=store)
    return proc


def test_train_job_runs_on_both_nodes_and_tracks_in_the_mlflow_server(cluster, trained_on_cluster):
    from pipeline import tracking

    proc = trained_on_cluster
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = proc.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "epoch 2/2" in proc.stdout  # the logs were streamed
    # The job saw both nodes, and warned about the local (not shared) paths it was given.
    assert "WARNING: data.train_path=" in proc.stdout and "this Ray cluster has 2 nodes" in proc.stdout
    assert f"job {job_id} SUCCEEDED" in proc.stderr

    mlc = tracking.client(cluster["mlflow"])
    exp = mlc.get_experiment_by_name("cluster")
    [run] = mlc.search_runs([exp.experiment_id], "attributes.run_name = 'cluster-train'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["num_workers"] == "2"
    assert run.data.params["scaling.placement_strategy"] == "STRICT_SPREAD"
    assert len(mlc.get_metric_history(run.info.run_id, "val_accuracy")) == 2
    assert run.data.metrics["best_val_accuracy"] > 0.34  # 3 classes: better than chance
    assert "config.yaml" in {a.path for a in mlc.list_artifacts(run.info.run_id)}
    version = mlc.get_model_version_by_alias("cluster-model", "current")
    assert version.run_id == run.info.run_id

    env = client_env(cluster)
    status = cli("jobs", "status", job_id, "--address", cluster["address"], env=env, cwd=cluster["work"])
    assert status.returncode == 0 and status.stdout.strip() == f"{job_id} SUCCEEDED"
    listed = cli("jobs", "list", "--address", cluster["address"], env=env, cwd=cluster["work"])
    assert job_id in listed.stdout and "python -m jobs.train" in listed.stdout
    logs = cli("jobs", "logs", job_id, "--address", cluster["address"], env=env, cwd=cluster["work"])
    assert "epoch 2/2" in logs.stdout and "run id:" in logs.stdout


def test_predict_job_uses_the_registered_alias(cluster, trained_on_cluster, synth_dir, tmp_path):
    import pyarrow.parquet as pq

    assert trained_on_cluster.returncode == 0
    out = tmp_path / "predictions"
    proc = cli("submit", "--address", cluster["address"], "--follow", "--", "predict",
               "--model", "models:/cluster-model@current", "--input", str(synth_dir / "val"),
               "--output", str(out), env=client_env(cluster), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = pq.read_table(out)
    source = pq.read_table(synth_dir / "val", columns=["id"])
    assert table.num_rows == source.num_rows
    assert sorted(table.column("id").to_pylist()) == sorted(source.column("id").to_pylist())


def test_job_failing_after_its_run_started_marks_the_run_failed(cluster, synth_dir, tmp_path):
    from pipeline import tracking

    # 5 workers x 1 CPU cannot fit the 4 CPUs of the cluster: the job fails after opening its run.
    proc = cli("submit", "--address", cluster["address"], "--follow", "--", "train",
               *train_args(synth_dir, tmp_path, **{"scaling.num_workers": "5",
                                                    "scaling.placement_strategy": "SPREAD",
                                                    "tracking.run_name": "cluster-too-big"}),
               env=client_env(cluster), cwd=tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: job raysubmit_") and " FAILED: " in last
    assert "need 5 CPUs, the Ray cluster has 4" in last and "exit code 2" in last
    assert "Traceback" not in proc.stderr
    mlc = tracking.client(cluster["mlflow"])
    exp = mlc.get_experiment_by_name("cluster")
    [run] = mlc.search_runs([exp.experiment_id], "attributes.run_name = 'cluster-too-big'")
    assert run.info.status == "FAILED"
    assert "need 5 CPUs" in run.data.tags["error"]


def test_job_with_a_bad_data_path_fails_with_its_error(cluster, synth_dir, tmp_path):
    # Without --follow: submit waits on the status, then shows the job's own error line.
    proc = cli("submit", "--address", cluster["address"], "--", "train",
               *train_args(synth_dir, tmp_path, **{"data.train_path": str(tmp_path / "missing")}),
               env=client_env(cluster), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.strip().startswith("raysubmit_")
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: job raysubmit_") and " FAILED: " in last
    assert str(tmp_path / "missing") in last
    assert "Traceback" not in proc.stderr


def test_stopping_a_training_job_marks_its_run_killed(cluster, synth_dir, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from pipeline import tracking

    proc = cli("submit", "--address", cluster["address"], "--no-wait", "--", "train",
               *train_args(synth_dir, tmp_path, **{"train.epochs": "100", "tracking.run_name": "cluster-stopped",
                                                    "tracking.registered_model_name": "null"}),
               env=client_env(cluster), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    # Watch through the SDK (no ray.init here): stop once the first epoch has been trained.
    sdk = JobSubmissionClient(cluster["address"], headers={"Authorization": f"Bearer {cluster['token']}"})
    deadline = time.time() + 150
    while "epoch 1/100" not in sdk.get_job_logs(job_id):
        assert time.time() < deadline and not sdk.get_job_status(job_id).is_terminal(), sdk.get_job_logs(job_id)
        time.sleep(1)
    stopped = cli("jobs", "stop", job_id, "--address", cluster["address"], env=client_env(cluster),
                  cwd=tmp_path, timeout=60)
    assert stopped.returncode == 0 and f"stopping job {job_id}" in stopped.stdout, stopped.stderr
    while not sdk.get_job_status(job_id).is_terminal():
        assert time.time() < deadline
        time.sleep(1)
    assert str(sdk.get_job_status(job_id)) == "STOPPED"
    mlc = tracking.client(cluster["mlflow"])
    [run] = mlc.search_runs([mlc.get_experiment_by_name("cluster").experiment_id],
                            "attributes.run_name = 'cluster-stopped'")
    assert run.info.status == "KILLED", sdk.get_job_logs(job_id)[-3000:]
    status = cli("jobs", "status", job_id, "--address", cluster["address"], env=client_env(cluster),
                 cwd=tmp_path, timeout=60)
    assert status.stdout.startswith(f"{job_id} STOPPED")


@pytest.mark.parametrize("auth, expected", [
    ({}, "requires a token"),
    ({"RAY_AUTH_TOKEN": "not-the-token"}, "rejected the token from RAY_AUTH_TOKEN"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "{bad_file}"}, "rejected the token from RAY_AUTH_TOKEN_PATH"),
])
def test_missing_or_wrong_token_is_one_clear_line(cluster, tmp_path, auth, expected):
    bad = tmp_path / "token"
    bad.write_text("wrong\n")
    env = {k: v.format(bad_file=bad) for k, v in auth.items()}
    proc = cli("jobs", "list", "--address", cluster["address"], env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "ray get-auth-token" in lines[0]


def test_token_from_a_file_in_token_mode_is_accepted(cluster, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(cluster["token"] + "\n")
    proc = cli("jobs", "list", "--address", cluster["address"], cwd=tmp_path, timeout=60,
               env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert proc.returncode == 0, proc.stderr


def test_unreachable_address_is_one_clear_line(synth_dir, tmp_path):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = cli("submit", "--follow", "--", "train", *train_args(synth_dir, tmp_path), cwd=tmp_path,
               env={"RAY_API_SERVER_ADDRESS": address, "MLFLOW_TRACKING_URI": "http://mlflow:5000"},
               timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the Ray dashboard at {address}" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_unknown_job_id_is_one_clear_line(cluster, tmp_path):
    proc = cli("jobs", "status", "raysubmit_nope", "--address", cluster["address"],
               env=client_env(cluster), cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "raysubmit_nope" in lines[0] and "jobs list" in lines[0], proc.stderr


def test_bad_stage_arguments_fail_before_contacting_the_cluster(tmp_path):
    # The address is unreachable: these errors must come from the local checks.
    env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{free_port()}"}
    proc = cli("submit", "--", "train", "model.hidden_sise=3", env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "unknown config key model.hidden_sise" in proc.stderr
    proc = cli("submit", "--", "train", "--bogus", env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "train: No such option '--bogus'" in proc.stderr
    proc = cli("submit", "--follow", "--no-wait", "--", "train", env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "exclude each other" in proc.stderr
