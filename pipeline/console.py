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
from typing import Callable, Iterator

from pipeline.errors import PipelineError

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


# --------------------------------------------------------------------------- progress and failures


class BelowError:
    """A logging filter for Ray Data's console handler (pipeline/ray_data_logging.yaml): records
    below ERROR pass; a failed task's ERROR lines go to the log file only."""
    def filter(self, record) -> bool:
        import logging

        return record.levelno < logging.ERROR


class EpochLines:
    """The driver's console during fit(): one line per epoch that rank 0 puts on the queue, with
    the epoch's wall time (checkpoint included) and an ETA from it; remembers when the first epoch
    started and the last one was reported, for the run's time breakdown.

        lines = EpochLines(queue, epochs, task, console, patience)
        with lines.running():
            trainer.fit()
    """

    def __init__(self, queue, epochs: int, task, console: Callable[[str], None],
                 patience: int | None):
        self.queue, self.epochs, self.task, self.console = queue, epochs, task, console
        self.patience = patience
        self.first_started: float | None = None
        self.last_reported: float | None = None
        self.walls: list[float] = []
        self.statistics_s = 0.0
        self._stop = threading.Event()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()
            while self._next(block=False):  # lines still on their way when fit() returned
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._next(block=True)

    def _next(self, block: bool) -> bool:
        try:
            m = self.queue.get(block=block, timeout=0.2 if block else None)
        except Exception:  # noqa: BLE001  (queue.Empty, or the queue actor gone at shutdown)
            return False
        self.show(m)
        return True

    def show(self, m: dict) -> None:
        if "note" in m:
            self.statistics_s += m.get("statistics_s", 0.0)
            self.console(m["note"])
            return
        done = m["epoch"]
        wall = m["reported_at"] - m["started_at"]
        self.first_started = self.first_started or m["started_at"]
        self.last_reported = m["reported_at"]
        self.walls.append(wall)
        recent = self.walls[-3:]  # epoch 1 streams the data; later ones may replay it from memory
        eta = sum(recent) / len(recent) * (self.epochs - done)
        self.console(f"epoch {done}/{self.epochs}  train_loss {m['train_loss']:.4f}  "
                     f"val_loss {m['val_loss']:.4f}  {self.task.console(m)}  "
                     f"{m['sequences_per_second']:.0f} seq/s  {wall:.1f}s  ETA {eta:.0f}s")
        if m.get("early_stopped"):
            self.console(f"early stopping: no better validation metric for {self.patience} epochs")


def explain_failure(exc: BaseException) -> str:
    """Our own user-facing error inside Ray Train's wrappers, else a summary of the worker's."""
    error = user_error_in(exc)
    if error is not None:
        return error.message
    return f"training failed on a worker ({first_line(exc)}); see the Ray worker logs"


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


# --------------------------------------------------------------------------- where time goes


class Timeline:
    """Wall time per phase of a command, printed at the end and logged as metrics, so a user sees
    what a small job's seconds went to (Ray start, data checks, worker start, epochs, ...).

        timeline = Timeline()
        with timeline.phase("ray_start"):
            ...
        timeline.add("epochs", 12.3)            # measured elsewhere (the workers)
        console(timeline.summary())            # time: 31.2s = Ray start 6.1s, ...
    """
    LABELS = {"data_checks": "data checks", "tracking": "MLflow", "ray_start": "Ray start",
              "statistics": "normalization", "worker_start": "workers start", "epochs": "epochs",
              "worker_stop": "workers stop", "ray_stop": "Ray stop",
              "model_logging": "model logging", "registration": "registration",
              "model_load": "model load", "predict": "predict", "publish": "publish"}

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self.start = self._clock()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begin = self._clock()
        try:
            yield
        finally:
            self.add(name, self._clock() - begin)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + max(seconds, 0.0)

    def total(self) -> float:
        return self._clock() - self.start

    def metrics(self) -> dict[str, float]:
        """`time_<phase>_s` for MLflow, plus the total and what no phase accounts for."""
        total = self.total()
        out = {f"time_{name}_s": round(s, 3) for name, s in self.seconds.items()}
        out["time_total_s"] = round(total, 3)
        out["time_other_s"] = round(max(total - sum(self.seconds.values()), 0.0), 3)
        return out

    def summary(self) -> str:
        total = self.total()
        parts = [f"{self.LABELS.get(n, n)} {s:.1f}s" for n, s in self.seconds.items()]
        other = total - sum(self.seconds.values())
        if other >= 0.05:
            parts.append(f"other {other:.1f}s")
        return f"{total:.1f}s = " + ", ".join(parts)
