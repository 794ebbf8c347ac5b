"""MLflow: where runs go, run lifecycle, metric logging, the logged pyfunc model and the registry.

The driver owns the run: it creates it before any cluster work (so every job has a run id, even
one that fails) and ends it FINISHED, FAILED or KILLED. Inside training only world rank 0 logs,
into that run id, through `MlflowClient` (no global active-run state crosses processes).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import PipelineError, TrackingError
from pipeline.redact import redact

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_CODE = str(Path(__file__).with_name("model.py"))


def resolve_tracking_uri(configured: str | None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else ./mlflow.db; local paths made absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):
            return "sqlite:///" + os.path.abspath(path)
        return uri
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        path = urlparse(uri).path if scheme == "file" else uri
        return Path(os.path.abspath(os.path.expanduser(path))).as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("sqlite", "file", "")


def resolve_artifact_location(uri: str, configured: str | None) -> str | None:
    """Artifact root for new experiments: configured, else ./mlartifacts for a local store.

    For a tracking server, None lets the server decide (with --serve-artifacts it proxies uploads).
    """
    if configured:
        scheme = urlparse(configured).scheme
        if scheme in ("", "file"):
            path = urlparse(configured).path if scheme == "file" else configured
            return Path(os.path.abspath(os.path.expanduser(path))).as_uri()
        return configured
    if is_local_store(uri):
        return Path(os.path.abspath("mlartifacts")).as_uri()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with one clear line when an HTTP tracking server does not answer."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise TrackingError(f"MLflow server at {redact(uri)} refused access (HTTP {exc.code}): set "
                                "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN") from None
        # Some proxies do not route /health; any HTTP answer means the server is up.
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow server at {redact(uri)} is unreachable ({reason}): start it (`lstm-pipeline ui` or "
            "`mlflow server`) or point tracking.tracking_uri / MLFLOW_TRACKING_URI at a running one"
        ) from None


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def checked_client(uri: str, key: str = "tracking.tracking_uri"):
    """A client whose tracking and registry stores MLflow has opened: its own check that it
    supports the URI (scheme, driver, store), as one line naming `key` instead of a traceback."""
    from mlflow.exceptions import MlflowException

    shown = redact(uri)
    try:
        mlc = client(uri)
        mlc.search_experiments(max_results=1)
        mlc.search_registered_models(max_results=1)
    except ImportError as exc:
        raise TrackingError(f"{key} {shown} needs a Python package MLflow could not import "
                            f"({exc}): install it (e.g. psycopg[binary] for postgresql://, "
                            "pymysql for mysql+pymysql://)") from None
    except MlflowException as exc:
        message = redact(" ".join(str(exc.message).split()))
        raise TrackingError(f"{key} {shown} is not a store MLflow can use ({message}): use "
                            "sqlite:///PATH.db, an mlflow server's http(s):// URL or a database "
                            "URI") from None
    except Exception as exc:  # noqa: BLE001  (a database that refuses the connection, ...)
        first = redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"{key} {shown} cannot be opened ({first}): check the URI, the "
                            "server and the credentials") from None
    return mlc


def get_or_create_experiment(mlc, name: str, artifact_location: str | None) -> str:
    exp = mlc.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted: restore it in the UI or "
                                "choose another tracking.experiment")
        return exp.experiment_id
    return mlc.create_experiment(name, artifact_location=artifact_location)


def open_experiment(configured_uri: str | None, experiment: str,
                    artifact_location: str | None) -> tuple[str, Any, str]:
    """(absolute tracking URI, client, experiment id), failing fast with one clear line."""
    import mlflow

    uri = resolve_tracking_uri(configured_uri)
    check_reachable(uri)
    # MLflow resolves models:/ URIs (downloads, pyfunc loading, registration) through the global
    # registry URI, whatever a call's tracking_uri says: point both globals at this store.
    mlc = checked_client(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        exp_id = get_or_create_experiment(mlc, experiment,
                                          resolve_artifact_location(uri, artifact_location))
    except PipelineError:
        raise
    except Exception as exc:
        raise TrackingError(f"MLflow at {redact(uri)} failed: {redact(str(exc))}") from None
    return uri, mlc, exp_id


@contextlib.contextmanager
def tracked_run(mlc, experiment_id: str, run_name: str, tags: dict[str, str],
                resume_run_id: str | None = None):
    """Yield a new run's id (or reopen `resume_run_id`); end it FINISHED, FAILED (error tag) or
    KILLED (Ctrl-C), never leaving it RUNNING."""
    tags = {k: redact(str(v)) for k, v in tags.items()}
    if resume_run_id is None:
        run_id = start_run(mlc, experiment_id, run_name, tags)
    else:
        run_id = resume_run_id
        mlc.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            mlc.set_tag(run_id, key, value)
        if "error" in mlc.get_run(run_id).data.tags:
            mlc.delete_tag(run_id, "error")
    try:
        yield run_id
    except KeyboardInterrupt:
        end_run(mlc, run_id, "KILLED", "interrupted by the user")
        raise
    except BaseException as exc:
        end_run(mlc, run_id, "FAILED",
                exc.message if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}")
        raise
    end_run(mlc, run_id, "FINISHED")


def start_run(mlc, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    run = mlc.create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id


def end_run(mlc, run_id: str, status: str, error: str | None = None) -> None:
    """FINISHED, FAILED or KILLED; a failure's message goes into the `error` tag."""
    if error:
        mlc.set_tag(run_id, "error", redact(error)[:5000])
    mlc.set_terminated(run_id, status=status)


def log_params(mlc, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, "null" if v is None else redact(str(v))[:6000])
             for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        mlc.log_batch(run_id, params=items[i:i + 100])


def log_metrics(mlc, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log a few metrics at once (the run's summary numbers)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    mlc.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


class MetricLogger:
    """Rank-0 metric logging that never blocks a training step: MLflow's async batch logging.

    Values for steps the run already has are skipped: after a restart (a dead worker, with or
    without a checkpoint yet; `--resume`) the first value logged for a step is the one kept and
    redone steps add nothing, so a metric's history has each step once.
    """

    def __init__(self, uri: str, run_id: str):
        self.mlc = client(uri)
        self.run_id = run_id
        self.pending: list = []
        self.logged_up_to: dict[str, int] = {}

    def _floor(self, key: str) -> int:
        """The last step logged for `key` before this process started (one query per key)."""
        if key not in self.logged_up_to:
            history = self.mlc.get_metric_history(self.run_id, key)
            self.logged_up_to[key] = max((m.step for m in history), default=-1)
        return self.logged_up_to[key]

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()
                         if step > self._floor(k)]
        if len(self.pending) >= 200:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        for i in range(0, len(self.pending), 1000):
            self.mlc.log_batch(self.run_id, metrics=self.pending[i:i + 1000], synchronous=wait)
        self.pending = []
        if wait:
            import mlflow

            mlflow.flush_async_logging()


def system_metrics_monitor(uri: str, run_id: str, interval: float):
    """Start MLflow's system metrics monitor (CPU, memory, disk, network; GPU through
    nvidia-ml-py when present) for this process's node; it logs `system/...` metrics into the run,
    continuing after the steps an earlier attempt logged. Returns it, to `finish()` at the end."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True,
                                   tracking_uri=uri)
    monitor.start()
    return monitor


def log_model(run_id: str, uri: str, state_dict: dict, spec, signature, input_example) -> str:
    """Log the pyfunc model (weights, its ModelSpec as meta.json, model.py as code) into the run;
    returns its URI."""
    import mlflow
    import mlflow.pyfunc
    import numpy
    import pandas
    import pyarrow
    import torch

    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pt")
        torch.save(state_dict, weights)
        meta_path = os.path.join(tmp, "meta.json")
        with open(meta_path, "w") as fh:
            fh.write(spec.to_json())
        requirements = [
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
            f"numpy=={numpy.__version__}",
            f"pandas=={pandas.__version__}",
            f"pyarrow=={pyarrow.__version__}",
        ]
        # Leaving this block marks the run FINISHED; the driver sets the final status after it.
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=MODEL_CODE,
                artifacts={"weights": weights, "meta": meta_path},
                signature=signature,
                input_example=input_example,
                pip_requirements=requirements,
            )
    return info.model_uri


def register_model(mlc, model_uri: str, run_id: str, name: str, alias: str | None,
                   description: str, tags: dict[str, str]) -> str:
    """Register `model_uri` under `name`, set `alias` on the new version; returns the version."""
    import contextlib
    import io

    import mlflow

    with contextlib.redirect_stderr(io.StringIO()):  # "Successfully registered model ..." chatter
        mv = mlflow.register_model(model_uri, name, tags=tags)
    mlc.update_model_version(name, mv.version, description=description)
    if alias:
        mlc.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)
