"""User-facing errors.

Anything the user can fix (bad config, bad data, unreachable service) is raised as a
`PipelineError`. The launchers in `jobs/` print its message as one line and exit non-zero,
without a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix; the message names it and says what to do."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None):
        self.message = message
        """As raised (Ray Data appends retry advice to the args of errors that pass through it)."""
        self.problems = problems or [message]
        super().__init__(message)


class ConfigError(PipelineError):
    """Unknown key, wrong type or bad value in a config file or override."""


class DataError(PipelineError):
    """The dataset cannot be used: missing, malformed, or inconsistent."""


class OutputError(PipelineError):
    """An output would overwrite, delete or mix with what the user owns (an input, the working
    directory, files this project did not write)."""


class TrackingError(PipelineError):
    """MLflow cannot be reached or refused an operation."""

    exit_code = 1


class TrainingError(PipelineError):
    """Training failed for a reason we could explain (diverged, a worker raised...)."""

    exit_code = 1


class NonFiniteLoss(TrainingError):
    """The loss became NaN or inf: training stops instead of going on with broken weights."""


class ClusterError(PipelineError):
    """The Ray cluster cannot be reached, refused the token, or does not know a job."""

    exit_code = 1


class JobFailedError(PipelineError):
    """A submitted job ended FAILED or STOPPED."""

    exit_code = 1


def collect(problems: list[str], cls: type[PipelineError] = PipelineError, what: str = "") -> None:
    """Raise `cls` listing every problem at once, or return when there are none."""
    if not problems:
        return
    if len(problems) == 1:
        raise cls(problems[0], problems)
    head = f"{len(problems)} problems{(' in ' + what) if what else ''}: "
    raise cls(head + "; ".join(problems), problems)
