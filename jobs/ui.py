"""Open the MLflow UI over the configured tracking store.

    lstm-pipeline ui                                   # ./mlflow.db, http://127.0.0.1:5000
    lstm-pipeline ui --port 5001 --tracking-uri sqlite:////abs/path/mlflow.db
    python -m jobs.ui --host 0.0.0.0                   # reachable from other machines
"""

from __future__ import annotations

import os
import sys

import click

from jobs.common import fail


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--tracking-uri", default=None,
              help="Store to browse; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 127.0.0.1 keeps the UI on this machine.")
@click.option("--port", default=5000, show_default=True, type=int)
def ui(tracking_uri: str | None, host: str, port: int) -> None:
    """Start the MLflow UI (an `mlflow server`) for the local store and print its URL."""
    from pipeline.tracking import is_local_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if not is_local_store(uri):
        fail(f"{uri} is already a tracking server: open it in a browser instead")
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        fail(f"no MLflow store at {uri[len('sqlite:///'):]}: run `lstm-pipeline train` first "
             "or pass --tracking-uri")
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    click.echo(f"MLflow UI for {uri} at http://{shown}:{port}  (Ctrl-C stops it)", err=True)
    sys.stdout.flush()
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", host, "--port", str(port), "--workers", "1"]
    os.execvp(args[0], args)


if __name__ == "__main__":
    ui()
