"""What every launcher shares: user errors as one line and an exit code, never a traceback."""

from __future__ import annotations

import functools
import os
import sys

import click

from pipeline.console import install_stop_handler
from pipeline.errors import PipelineError
from pipeline.redact import redact


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def user_errors(fn):
    """Turn PipelineError into `error: ...` lines on stderr and a non-zero exit; Ctrl-C into 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # A scheduler's stop (SIGTERM, e.g. `lstm-pipeline jobs stop`) ends the command like
        # Ctrl-C at any point, so an MLflow run is marked KILLED rather than left RUNNING.
        install_stop_handler()
        try:
            return fn(*args, **kwargs)
        except PipelineError as exc:
            for problem in exc.problems:
                click.echo(f"error: {redact(problem)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def quiet_libraries(progress_bars: bool = False) -> None:
    """Keep the console to our own lines: no MLflow chatter, Ray Data progress bars on request."""
    if not progress_bars:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray Data configures its loggers when it is imported, after this runs; it reads the level
    # from this variable (set it to INFO to see Ray Data's execution plans again).
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("mlflow", "alembic", "ray", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not progress_bars:  # not a warning about the job: that they are off is what we asked for
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray Data logs a failed task at ERROR on the console before raising it; the command reports
    # the failure itself, in one line, so the console keeps Ray Data's warnings only (its log
    # file keeps everything).
    import ray.data  # noqa: F401  (configures Ray Data's handlers)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(lambda record: record.levelno < logging.ERROR)
