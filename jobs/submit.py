"""Run the pipeline's stages on a Ray cluster as Ray jobs (`jobs ...`: jobs/jobs_cmd.py).

    export RAY_API_SERVER_ADDRESS=http://head:8265       # the head node's dashboard (or --address)
    export RAY_AUTH_TOKEN=$(ssh head ray get-auth-token)  # clusters started with RAY_AUTH_MODE=token
    export MLFLOW_TRACKING_URI=http://mlflow:5000         # passed on to the job

    lstm-pipeline submit --follow -- train -c conf/train.yaml scaling.num_workers=4 scaling.use_gpu=true
    lstm-pipeline submit --no-wait -- predict --model models:/lstm-classifier@current \\
        --input s3://bucket/seqs --output s3://bucket/predictions
    lstm-pipeline submit --address http://head:8265 -- data check s3://bucket/train
    lstm-pipeline jobs list
    lstm-pipeline jobs status raysubmit_XYZ
    lstm-pipeline jobs logs raysubmit_XYZ --follow
    lstm-pipeline jobs stop raysubmit_XYZ
    python -m jobs.submit --follow -- train train.epochs=10

`submit` checks the stage's options and config here, ships this project as the job's
`working_dir` (without data, runs, virtualenvs and caches), runs `python -m jobs.<stage> ARGS` on
the cluster with the MLflow variables of this shell, prints the job id on stdout and then waits:
`--follow` also streams the logs, `--no-wait` returns at once. It exits 0 when the job SUCCEEDED
and 1 otherwise, with the job's own error line.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click

from jobs.common import user_errors
from pipeline.errors import ConfigError, PipelineError
from pipeline.redact import redact

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


class ClusterError(PipelineError):
    """The Ray cluster cannot be reached, refused the token, or does not know a job."""

    exit_code = 1


class JobFailedError(PipelineError):
    """The submitted job ended FAILED or STOPPED."""

    exit_code = 1


# --------------------------------------------------------------------------- pure helpers


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
    from pipeline.redact import has_secret

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
    from pipeline.report import GIT_COMMIT_ENV, git_commit

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


def relative_path_warnings(named_paths: dict[str, Any], tracking_uri: str | None) -> list[str]:
    """Warn about paths the job cannot see: relative ones resolve inside the job's copy of the
    project (which leaves out data/), and a local MLflow store stays on one cluster node."""
    from pipeline.storage import is_uri
    from pipeline.tracking import is_local_store

    warnings = []
    for name, value in named_paths.items():
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str) and path and not is_uri(path) and not os.path.isabs(path) \
                    and not path.startswith("file:"):
                warnings.append(f"{name}={path} is relative: the job resolves it inside its copy of "
                                "the project on the cluster, which leaves out data/ and runs; use a "
                                "URI (s3://, gs://) or an absolute path on storage every node mounts")
    if not tracking_uri:
        warnings.append("MLFLOW_TRACKING_URI is not set: the job will track into sqlite:///mlflow.db "
                        "in its temporary directory on the cluster; export "
                        "MLFLOW_TRACKING_URI=http://<mlflow-server>:5000")
    elif is_local_store(tracking_uri):
        warnings.append(f"the MLflow store {tracking_uri} is a local file: only one node of a real "
                        "cluster sees it; use a shared `mlflow server` (http://...)")
    return warnings


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


# --------------------------------------------------------------------------- checks before submitting


def _parse_stage(stage: str, args: list[str]) -> dict[str, Any]:
    """Parse ARGS with the stage's own click command (no cluster needed): the leaf's params."""
    import importlib

    try:
        module = importlib.import_module(f"jobs.{stage}")
    except ModuleNotFoundError as exc:
        if exc.name != f"jobs.{stage}":
            raise
        return {}  # a stage this checkout lacks: the cluster's copy will report it
    cmd: click.Command = getattr(module, stage)
    name, rest = stage, list(args)
    try:
        while isinstance(cmd, click.Group):
            if not rest or rest[0] not in cmd.commands:
                got = f", got {rest[0]!r}" if rest else ""
                raise click.UsageError(f"expected a command, one of {', '.join(sorted(cmd.commands))}{got}")
            name, cmd, rest = f"{name} {rest[0]}", cmd.commands[rest[0]], rest[1:]
        with cmd.make_context(name, rest) as ctx:
            return dict(ctx.params)
    except click.exceptions.Exit:
        raise  # --help was asked for
    except click.ClickException as exc:
        raise ConfigError(f"{name}: {exc.format_message()}") from None


def check_stage(stage: str, args: list[str], root: Path, env: Mapping[str, str]) -> list[str]:
    """Validate the stage's options (and a train config) here; return warnings for the user."""
    params = _parse_stage(stage, args)
    tracking_uri = env.get("MLFLOW_TRACKING_URI")
    if stage == "train":
        from pipeline.config import TrainJobConfig, load_config

        config = params.get("config_path")
        # The job reads the config from its copy of the project, so check that copy's file.
        local = config if config is None or os.path.isabs(config) else root / config
        cfg = load_config(TrainJobConfig, local, list(params.get("overrides", ())))
        return relative_path_warnings(
            {"data.train_path": cfg.data.train_path, "data.val_path": cfg.data.val_path,
             "train.storage_path": cfg.train.storage_path},
            cfg.tracking.tracking_uri or tracking_uri)
    if stage == "predict":
        # --input / --output (params input_path, output_path); the config file ships with the job.
        named = {f"--{k.removesuffix('_path')}": list(v) if isinstance(v, tuple) else v
                 for k, v in params.items() if k.endswith("_path") and k != "config_path" and v}
        overrides = [a for a in params.get("overrides", ()) if a.startswith("tracking.tracking_uri=")]
        return relative_path_warnings(named, overrides[-1].partition("=")[2] if overrides else tracking_uri)
    return []


# --------------------------------------------------------------------------- talking to the cluster


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


class Cluster:
    """A JobSubmissionClient whose failures are one-line ClusterErrors."""

    def __init__(self, address: str | None, env: Mapping[str, str] = os.environ):
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
            click.echo(f"warning: sending the Ray token ({self.token_source}) to {self.address} "
                       "over plain http: anyone on the network path can read it and run jobs on "
                       "the cluster; use https:// (a TLS proxy in front of the dashboard) or an "
                       "SSH tunnel to 127.0.0.1", err=True)
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

    def info(self, job_id: str):
        return self.call(self.client.get_job_info, job_id)

    def stream_logs(self, job_id: str, echo) -> None:
        """Print the job's logs as they come until the job ends (websocket closes)."""
        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                echo(chunk, nl=False)

        self.call(asyncio.run, tail())

    def wait(self, job_id: str, follow: bool, echo, note) -> str:
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


def _outcome(cluster: Cluster, job_id: str, status: str) -> None:
    if status == "SUCCEEDED":
        click.echo(f"job {job_id} SUCCEEDED", err=True)
        return
    raise JobFailedError(f"job {job_id} {status}: {failure_summary(cluster.info(job_id).message)}")


# --------------------------------------------------------------------------- commands

ADDRESS = click.option("--address", default=None, metavar="URL",
                       help="The head node's dashboard, e.g. http://head:8265. Default: "
                            "RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else " + DEFAULT_ADDRESS)


@click.command(context_settings={"help_option_names": ["-h", "--help"],
                                 "ignore_unknown_options": True, "allow_interspersed_args": False})
@ADDRESS
@click.option("--follow", is_flag=True, help="Stream the job's logs until it ends.")
@click.option("--no-wait", is_flag=True, help="Print the job id and return at once.")
@click.argument("stage", type=click.Choice(STAGES))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def submit(address: str | None, follow: bool, no_wait: bool, stage: str, args: tuple[str, ...]) -> None:
    """Run STAGE (train, predict, data) with ARGS as a Ray job on a cluster.

    \b
    lstm-pipeline submit --follow -- train -c conf/train.yaml scaling.num_workers=4
    lstm-pipeline submit --no-wait -- predict --model models:/lstm-classifier@current --input s3://b/in --output s3://b/out

    The job id goes to stdout; exit 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED.
    """
    if follow and no_wait:
        raise ConfigError("--follow and --no-wait exclude each other: pick one")
    root = find_project_root(Path.cwd())
    entrypoint = build_entrypoint(stage, args)
    check_no_secrets(entrypoint, os.environ)
    for warning in check_stage(stage, list(args), root, os.environ):
        click.echo(f"warning: {redact(warning)}", err=True)
    # Ray's packaging leaves out what the project's .gitignore files ignore, unless told not to.
    os.environ.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
    cluster = Cluster(address)
    job_id = cluster.call(cluster.client.submit_job, entrypoint=entrypoint,
                          runtime_env=build_runtime_env(root, os.environ),
                          metadata={"submitted_by": "lstm-pipeline", "stage": stage})
    click.echo(job_id)
    click.echo(f"submitted `{entrypoint}` to {cluster.address}", err=True)
    if no_wait:
        click.echo(f"follow it with: lstm-pipeline jobs logs {job_id} --follow", err=True)
        return
    try:
        status = cluster.wait(job_id, follow, click.echo, lambda m: click.echo(m, err=True))
    except KeyboardInterrupt:
        click.echo(f"stopped waiting; job {job_id} keeps running (lstm-pipeline jobs stop {job_id})",
                   err=True)
        raise
    _outcome(cluster, job_id, status)


if __name__ == "__main__":
    submit()
