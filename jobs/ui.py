"""Open the MLflow UI over the configured tracking store.

    lstm-pipeline ui                                   # ./mlflow.db, http://127.0.0.1:5000
    lstm-pipeline ui --port 5001 --tracking-uri sqlite:////abs/path/mlflow.db
    lstm-pipeline ui --tracking-uri postgresql+psycopg2://mlflow@db/mlflow
    python -m jobs.ui --host 0.0.0.0                   # every interface (no authentication!)
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

import click

from jobs.common import fail, quiet_libraries


def _check_port_free(host: str, port: int) -> None:
    """The MLflow server would log a bind error among its INFO lines and exit 0 a minute later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}): another server "
                 f"(another `lstm-pipeline ui`?) uses it; pass a free --port, e.g. --port {port + 1}")


EVERY_INTERFACE = ("0.0.0.0", "::", "")


def _addresses(host: str, port: int) -> list[str]:
    """The URLs the server answers at: every IPv4 address of this machine for 0.0.0.0."""
    if host not in EVERY_INTERFACE:
        return [f"http://{host}:{port}"]
    import psutil

    names = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
             if a.family == socket.AF_INET} | {"127.0.0.1"}
    return [f"http://{name}:{port}" for name in sorted(names, key=lambda n: (n != "127.0.0.1", n))]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--tracking-uri", default=None,
              help="Store to browse; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 127.0.0.1 keeps the UI on this machine. The MLflow UI has "
                   "no authentication: 0.0.0.0 shows every run to anyone who can reach the port.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
def ui(tracking_uri: str | None, host: str, port: int) -> None:
    """Start the MLflow UI (an `mlflow server`) for the local store and print its URL."""
    quiet_libraries()
    from pipeline.errors import PipelineError
    from pipeline.redact import redact
    from pipeline.tracking import checked_client, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if urlparse(uri).scheme in ("http", "https"):
        fail(f"{redact(uri)} is already a tracking server: open it in a browser instead")
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        fail(f"no MLflow store at {uri[len('sqlite:///'):]}: run `lstm-pipeline train` first "
             "or pass --tracking-uri")
    try:
        checked_client(uri, "--tracking-uri")  # MLflow's own check of the store, in one line
    except PipelineError as exc:
        fail(redact(str(exc)))
    _check_port_free(host, port)
    urls = _addresses(host, port)
    everywhere = host in EVERY_INTERFACE
    click.echo(f"MLflow UI for {redact(uri)} at {urls[0]}"
               + (f" (listening on {host or '0.0.0.0'}, every interface"
                  + (f": also {', '.join(urls[1:])})" if urls[1:] else ")") if everywhere else "")
               + "  (Ctrl-C stops it)", err=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: --host {host} exposes the MLflow UI, which has no authentication, "
                   "to every machine that can reach this one: anyone there can read and delete "
                   "runs and models; keep 127.0.0.1 or put an authenticating proxy in front",
                   err=True)
    sys.stdout.flush()
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", host, "--port", str(port), "--workers", "1"]
    os.execvp(args[0], args)


if __name__ == "__main__":
    ui()
