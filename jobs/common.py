"""What every launcher shares: user errors as one line and an exit code, never a traceback."""

from __future__ import annotations

import functools
import os
import shlex
import sys
from pathlib import Path

import click

from pipeline.console import install_stop_handler
from pipeline.errors import PipelineError
from pipeline.redact import redact


def command_line() -> str:
    """The command as the user typed it, for the run's description."""
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0])] + sys.argv[1:])


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
    # the failure itself, in one line (pipeline/ray_data_logging.yaml).
    import pipeline

    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG",
                          str(Path(pipeline.__file__).with_name("ray_data_logging.yaml")))


def parse_stage(stage: str, args: list[str]) -> dict:
    """Parse ARGS with the stage's own click command, without running it: the leaf's params
    (`submit` checks a job's arguments here before sending it to a cluster)."""
    import importlib

    from pipeline.errors import ConfigError

    cmd: click.Command = getattr(importlib.import_module(f"jobs.{stage}"), stage)
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
