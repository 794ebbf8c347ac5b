"""Running the pipeline's stages as Ray jobs on a cluster: the Ray Jobs client side.

    cluster = Cluster("http://head:8265")                          # address and token resolved
    job_id = cluster.submit(build_entrypoint("train", args), build_runtime_env(root, os.environ))
    status = cluster.wait(job_id, follow=True, echo=print, note=print)

What a job gets: the project as its `working_dir` (no data, runs, virtualenvs or secrets), the
MLflow tracking URI and nothing secret (a job's entrypoint and runtime_env are readable through
the dashboard), and a stop grace period. Where the cluster is (`--address`, RAY_API_SERVER_ADDRESS,
RAY_ADDRESS) and its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, RAY_AUTH_MODE) are resolved in
Ray's precedence order. One rule decides which paths a job on a cluster cannot see
(`unshared_paths`): submit warns about relative ones, training about local ones on several nodes.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from pipeline.errors import ClusterError, ConfigError, JobFailedError, PipelineError
from pipeline.redact import has_secret, redact
from pipeline.report import GIT_COMMIT_ENV, git_commit
from pipeline.storage import is_uri
from pipeline.tracking import DEFAULT_TRACKING_URI, is_local_store

STAGES = ("train", "predict", "data")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Shipped with every job: where MLflow is, so the job logs where this shell would. Nothing secret:
# a job's runtime_env is metadata that anyone with dashboard or Jobs API access reads back, so
# MLFLOW_TRACKING_USERNAME / PASSWORD / TOKEN stay here; the cluster's nodes get credentials
# their own way (README, "Credentials on the cluster").
PASSED_ENV = ("MLFLOW_TRACKING_URI",)
# gitignore patterns, relative to the project root, on top of the project's own .gitignore files
# (which Ray's packaging honours; submit makes sure it does). Data and runs belong on shared
# storage, not in the job package (Ray caps a package at a few hundred MiB and uploads it on
# every change); secrets and keys never leave this machine in a package.
EXCLUDES = ["/data/", "/mlruns/", "/mlartifacts/", "/ray_results/", "/predictions/", "/.venv/",
            "/venv/", "/.git/", "__pycache__/", ".pytest_cache/", "*.egg-info/", "*.db",
            "*.db-journal",
            ".env", ".env.*", "*.env", ".envrc", "secrets.*", "*secret*", "*.secret", "*.pem",
            "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "id_rsa*", "id_dsa*",
            "id_ecdsa*", "id_ed25519*", ".netrc", "_netrc", ".pgpass", ".git-credentials",
            ".pypirc", ".npmrc", ".dockercfg", ".docker/", ".aws/", ".ssh/", ".gnupg/",
            ".kube/", "kubeconfig*", "*.kubeconfig", "credentials*", "*credentials.json",
            "*.token", "auth_token", ".databrickscfg", "*.tfstate", "*.tfvars"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOP_WAIT_S = "30"


def resolve_address(flag: str | None, env: Mapping[str, str]) -> str:
    """The dashboard URL: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else local.

    Ray's SDK lets the environment win over its argument; an explicit flag should win. Only
    http(s) URLs (a bare host:port means http): the SDK's GCS and ray:// lookups hang for a minute
    on a wrong address and end in a traceback.
    """
    sources = [("--address", flag), ("RAY_API_SERVER_ADDRESS", env.get("RAY_API_SERVER_ADDRESS")),
               ("RAY_ADDRESS", env.get("RAY_ADDRESS")), ("the default", DEFAULT_ADDRESS)]
    source, address = next((name, value.strip()) for name, value in sources if value and value.strip())
    if "://" not in address and address not in ("auto", "local"):
        address = f"http://{address}"
    if urlparse(address).scheme not in ("http", "https") or not urlparse(address).netloc:
        raise ConfigError(f"{source} {address!r} is not the Ray dashboard's URL: jobs go to the head "
                          "node's dashboard, e.g. --address http://<head>:8265")
    return address.rstrip("/")


def resolve_auth_token(env: Mapping[str, str], home: Path) -> tuple[str | None, str]:
    """The token to send and where it came from, in Ray's precedence order.

    Ray 2.60's client sends a token only when RAY_AUTH_MODE=token; we also send an explicitly set
    RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, but ~/.ray/auth_token only in token mode, since that file
    usually belongs to a local cluster and should not go to every address.
    """
    mode = env.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} is missing or empty: point it at the "
                               "cluster's token file or set RAY_AUTH_TOKEN")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    if mode == "token":
        path = home / ".ray" / "auth_token"
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise ClusterError(f"RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN (print it on "
                               f"the head node with `ray get-auth-token`) or write it to {path}")
        return token, str(path)
    return None, "RAY_AUTH_TOKEN is not set"


def plaintext_remote(address: str) -> bool:
    """http:// to anything but this machine."""
    import ipaddress

    parsed = urlparse(address)
    if parsed.scheme != "http" or parsed.hostname in (None, "localhost"):
        return False
    try:
        return not ipaddress.ip_address(parsed.hostname).is_loopback
    except ValueError:
        return True


def build_entrypoint(stage: str, args: list[str] | tuple[str, ...]) -> str:
    """The shell command the job runs: the stage as a module, arguments quoted."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}: submit one of {', '.join(STAGES)} "
                          "(e.g. lstm-pipeline submit -- train -c conf/train.yaml)")
    return shlex.join(["python", "-m", f"jobs.{stage}", *args])


def check_no_secrets(entrypoint: str, env: Mapping[str, str]) -> None:
    """Refuse to put a credential into the job's metadata (entrypoint or environment): anyone who
    can read the cluster's dashboard or Jobs API reads it back."""
    for name in PASSED_ENV:
        if env.get(name) and has_secret(env[name]):
            raise ConfigError(f"{name}={redact(env[name])} carries a credential, which would be "
                              "stored in plain text in the job's metadata: export it without the "
                              "credential and give the cluster's nodes MLFLOW_TRACKING_USERNAME / "
                              "PASSWORD or TOKEN (README, \"Credentials on the cluster\")")
    if has_secret(entrypoint):
        raise ConfigError(f"the job's command `{redact(entrypoint)}` carries a credential, which "
                          "would be stored in plain text in the job's metadata: pass URIs without "
                          "user:password@ or tokens, and give the cluster's nodes the credentials "
                          "(README, \"Credentials on the cluster\")")


def build_runtime_env(root: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """The project as working_dir, where MLflow is (never its credentials), and a stop grace."""
    env_vars = {name: env[name] for name in PASSED_ENV if env.get(name)}
    # Job logs are streamed line by line; Python buffers them without this.
    env_vars["PYTHONUNBUFFERED"] = "1"
    # `jobs stop` sends SIGTERM, then SIGKILL after this many seconds (read by the job's
    # supervisor). Ray's 3 s default can cut off a training driver while it aborts its workers
    # and marks its MLflow run KILLED, leaving the run RUNNING forever.
    env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = env.get("RAY_JOB_STOP_WAIT_TIME_S") or STOP_WAIT_S
    # The working_dir upload leaves .git out: the job records the submitting checkout's commit.
    commit = git_commit()
    if commit:
        env_vars[GIT_COMMIT_ENV] = commit
    return {"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": env_vars}


def find_project_root(start: Path) -> Path:
    """The checkout holding this package (editable installs), else the first parent of `start`
    with our pyproject.toml (the image's WORKDIR)."""
    for candidate in [Path(__file__).resolve().parents[1], start.resolve(), *start.resolve().parents]:
        pyproject = candidate / "pyproject.toml"
        if (pyproject.is_file() and (candidate / "jobs").is_dir()
                and 'name = "lstm-pipeline"' in pyproject.read_text()):
            return candidate
    raise PipelineError("cannot find the lstm-pipeline project to ship with the job: run submit "
                        "from the project directory (the one with pyproject.toml)")


def unshared_paths(named: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, path) of every path in `named` (a path, a list of paths or None per key) that is not
    a URI, so lives on one machine's disk: a job on a cluster sees it only through a mount every
    node has at the same place."""
    return [(name, path) for name, value in named.items() if value
            for path in ([value] if isinstance(value, str) else value)
            if isinstance(path, str) and path and not is_uri(path)]


def relative_path_warnings(named_paths: Mapping[str, Any], tracking_uri: str | None) -> list[str]:
    """Before submitting: relative paths resolve inside the job's copy of the project (which
    leaves out data/), and a local MLflow store stays on one cluster node."""
    warnings = [f"{name}={path} is relative: the job resolves it inside its copy of the project "
                "on the cluster, which leaves out data/ and runs; use a URI (s3://, gs://) or an "
                "absolute path on storage every node mounts"
                for name, path in unshared_paths(named_paths)
                if not os.path.isabs(path) and not path.startswith("file:")]
    if not tracking_uri:
        warnings.append("MLFLOW_TRACKING_URI is not set: the job will track into sqlite:///mlflow.db "
                        "in its temporary directory on the cluster; export "
                        "MLFLOW_TRACKING_URI=http://<mlflow-server>:5000")
    elif is_local_store(tracking_uri):
        warnings.append(f"the MLflow store {tracking_uri} is a local file: only one node of a real "
                        "cluster sees it; use a shared `mlflow server` (http://...)")
    return warnings


def shared_path_warnings(cfg, num_nodes: int) -> list[str]:
    """On a cluster of several nodes: one warning per local path of a training config (its
    tracking URI already resolved). Ray Data reads and checkpoints run on other nodes, and a
    local MLflow store is invisible there; a local path works only if every node mounts it at the
    same place (NFS), so this warns instead of failing."""
    if num_nodes <= 1:
        return []
    local = unshared_paths({"data.train_path": cfg.data.train_path, "data.val_path": cfg.data.val_path,
                            "train.storage_path": cfg.train.storage_path})
    uri = cfg.tracking.tracking_uri or DEFAULT_TRACKING_URI
    if is_local_store(uri):
        local.append(("tracking.tracking_uri", uri))
    local += unshared_paths({"tracking.artifact_location": cfg.tracking.artifact_location})
    return [f"{name}={path} is local to one machine but this Ray cluster has {num_nodes} nodes: use "
            "a shared URI (s3://, gs://, an mlflow server's http://) or an NFS mount present on "
            "every node" for name, path in local]


def failure_summary(message: str | None) -> str:
    """One line from Ray's job message: the exit status and the job's own `error:` lines, else
    the last log line (e.g. an exception)."""
    if not message:
        return "no message from Ray (see `lstm-pipeline jobs logs`)"
    head, _, logs = message.partition(", last available logs")
    lines = [line.strip() for line in logs.splitlines()[1:] if line.strip()]
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    detail = "; ".join(errors) if errors else (lines[-1] if lines else "")
    head = head.strip().splitlines()[0] if head.strip() else ""
    return f"{detail} ({head})" if detail and head else detail or head


def _translate(exc: BaseException, address: str, token_source: str) -> ClusterError | None:
    """Ray's and requests' connection and auth failures as one actionable line."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    if isinstance(exc, AuthenticationError):
        if str(exc.message).startswith("Authentication required"):
            return ClusterError(f"the Ray cluster at {address} requires a token and none was sent "
                                f"({token_source}): "
                                "export RAY_AUTH_TOKEN=<token> (print it on the head node with "
                                "`ray get-auth-token`)")
        return ClusterError(f"the Ray cluster at {address} rejected the token from {token_source}: "
                            "export the cluster's RAY_AUTH_TOKEN (print it on the head node with "
                            "`ray get-auth-token`)")
    if isinstance(exc, (ConnectionError, requests.exceptions.RequestException,
                        aiohttp.ClientConnectionError)):
        return ClusterError(f"cannot reach the Ray dashboard at {address}: start the cluster or fix "
                            "--address / RAY_API_SERVER_ADDRESS / RAY_ADDRESS (the head node's "
                            "dashboard, http://<head>:8265)")
    return None


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


class Cluster:
    """A JobSubmissionClient whose failures are one-line ClusterErrors. `note` prints what the
    user should know on the way (stderr by default)."""
    def __init__(self, address: str | None, env: Mapping[str, str] = os.environ,
                 note: Callable[[str], None] = _to_stderr):
        import logging

        from ray.job_submission import JobSubmissionClient

        # The SDK narrates packaging and websockets at INFO (and warns that it skips .git, which
        # we exclude anyway); keep the console to the job id, the job's logs and its outcome.
        for name, level in (("ray.dashboard.modules.dashboard_sdk", logging.WARNING),
                            ("ray.dashboard.modules.job.sdk", logging.WARNING),
                            ("ray._private.runtime_env.packaging", logging.WARNING),
                            ("ray._private.runtime_env.working_dir", logging.ERROR)):
            logging.getLogger(name).setLevel(level)
        self.address = resolve_address(address, env)
        token, self.token_source = resolve_auth_token(env, Path.home())
        headers = {"Authorization": f"Bearer {token}"} if token else None
        if token and plaintext_remote(self.address):
            note(f"warning: sending the Ray token ({self.token_source}) to {self.address} over "
                 "plain http: anyone on the network path can read it and run jobs on the "
                 "cluster; use https:// (a TLS proxy in front of the dashboard) or an SSH tunnel "
                 "to 127.0.0.1")
        previous = os.environ.get("RAY_API_SERVER_ADDRESS")
        # The SDK prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its argument; point the
        # variable at the address we resolved so --address wins, then restore it.
        os.environ["RAY_API_SERVER_ADDRESS"] = self.address
        try:
            self.client = self.call(JobSubmissionClient, self.address, headers=headers)
        finally:
            if previous is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = previous

    def call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            error = _translate(exc, self.address, getattr(self, "token_source", ""))
            if error is None and "status code 404" in str(exc):
                error = ClusterError(f"{str(exc).split(': ', 1)[-1].rstrip('.')} on the Ray cluster at "
                                     f"{self.address}: `lstm-pipeline jobs list` shows its jobs")
            if error is None:
                raise
            raise error from None

    def submit(self, entrypoint: str, runtime_env: dict[str, Any], stage: str) -> str:
        return self.call(self.client.submit_job, entrypoint=entrypoint, runtime_env=runtime_env,
                         metadata={"submitted_by": "lstm-pipeline", "stage": stage})

    def info(self, job_id: str):
        return self.call(self.client.get_job_info, job_id)

    def jobs(self) -> list:
        """Every job the cluster knows, oldest first."""
        return sorted(self.call(self.client.list_jobs), key=lambda j: j.start_time or 0)

    def logs(self, job_id: str) -> str:
        return self.call(self.client.get_job_logs, job_id)

    def stop(self, job_id: str) -> bool:
        """SIGTERM to the job; False when it had already ended."""
        return self.call(self.client.stop_job, job_id)

    def stream_logs(self, job_id: str, echo: Callable[[str], None]) -> None:
        """Pass the job's logs to `echo` as they come until the job ends (websocket closes)."""
        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                echo(chunk)

        self.call(asyncio.run, tail())

    def outcome(self, job_id: str, status: str) -> None:
        """Return for SUCCEEDED; raise JobFailedError with the job's own error line otherwise."""
        if status != "SUCCEEDED":
            raise JobFailedError(f"job {job_id} {status}: {failure_summary(self.info(job_id).message)}")

    def wait(self, job_id: str, follow: bool, echo: Callable[[str], None],
             note: Callable[[str], None]) -> str:
        """Block until the job ends; returns its final status."""
        if follow:
            try:
                self.stream_logs(job_id, echo)
            except Exception as exc:  # the stream is a convenience; the status decides the outcome
                note(f"log stream lost ({exc}); waiting for the job's status")
        last = None
        while True:
            status = str(self.call(self.client.get_job_status, job_id))
            if status != last and not follow:
                note(f"job {job_id}: {status}")
            last = status
            if status in TERMINAL:
                return status
            time.sleep(1.0 if follow else 2.0)
