"""Stopping a command: Ctrl-C and SIGTERM, one handler for every command and every moment.

    install_stop_handler()          # at the start of a command (jobs/common.py does it)
    with signals_deferred():        # around a start that must not be cut in half (ray.init)
        ray.init(...)
    with fit_interruptible():       # around trainer.fit(): Ray Train aborts its workers first
        trainer.fit()

A stop raises KeyboardInterrupt in the main thread wherever the command is (validating data,
computing statistics, logging a model, predicting): the `with` blocks above it mark the MLflow run
KILLED and stop the Ray they started, and the launcher exits 130. `jobs stop` and a Kubernetes
pod stop send SIGTERM, a terminal sends SIGINT: both take this path. Once a stop is under way,
further signals are ignored until the cleanup is done, so a second Ctrl-C cannot leave a run
RUNNING half-way through closing it.

Why re-install: `ray.init()` replaces the SIGTERM handler with one that calls sys.exit (the run
would end FAILED, not KILLED), and Ray Train's `fit()` installs its own SIGINT handler.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _ignore(signum, frame) -> None:
    """A stop is already under way: let its cleanup finish."""


def _ignore_further_stops() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _ignore)


def _stop(signum, frame) -> None:
    _ignore_further_stops()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install_stop_handler() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (no-op in other threads)."""
    if _main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _stop)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while the block runs (a Ray start cut in half leaves processes
    that nobody stops), then put the handlers back as they were and act on what arrived.

    `ray.init()` installs, as its first step, a SIGTERM handler that calls sys.exit; it is kept
    from doing so inside the block, so a SIGTERM there is held like any other."""
    if not _main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    pending: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    ray_utils = sys.modules.get("ray._private.utils")
    replace = getattr(ray_utils, "set_sigterm_handler", None)
    if replace is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if replace is not None:
            ray_utils.set_sigterm_handler = replace
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        signal.raise_signal(pending[0])  # handled now, by the handler that was in place


@contextlib.contextmanager
def fit_interruptible() -> Iterator[None]:
    """Around Ray Train's `fit()`: its SIGINT handler aborts the controller (stopping the workers)
    and then calls sys.exit(0); SIGTERM is routed to it, and its exit becomes KeyboardInterrupt."""
    if not _main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    stopped = False
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        stopped = True
        _ignore_further_stops()
        raise KeyboardInterrupt("SIGINT") from None
    finally:
        if not stopped:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# --------------------------------------------------------------------------- failures


def _causes(exc: BaseException):
    """exc and everything Ray wrapped inside it (causes, contexts, per-worker failures)."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        stack += list(getattr(e, "worker_failures", {}).values())


def user_error_in(exc: BaseException):
    """The PipelineError (a problem the user can fix) that a Ray task, actor or worker raised,
    found inside Ray's wrappers; None when there is none."""
    from ray.exceptions import RayError

    from pipeline.errors import PipelineError

    for e in _causes(exc):
        # Ray re-raises a task's error as a class derived from both RayTaskError and the error's
        # own class, whose message is the whole remote traceback: take the original inside it.
        if isinstance(e, PipelineError) and not isinstance(e, RayError):
            return e
    return None


def first_line(exc: BaseException) -> str:
    """`Type: last line of the message` of the innermost wrapped error: what a log line shows."""
    inner = list(_causes(exc))
    e = inner[1] if len(inner) > 1 else exc
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1]}" if text else type(e).__name__
