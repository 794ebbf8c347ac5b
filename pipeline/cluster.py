"""Connecting to Ray: a running one, a cluster address, or a local Ray sized for the job."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from urllib.parse import urlparse

from pipeline.console import signals_deferred
from pipeline.errors import PipelineError


def local_cpus(configured: int | None) -> int:
    """Logical CPUs of a local Ray: the cores plus two for Ray Data's read and split tasks, which
    otherwise wait forever behind training workers or predict actors holding every core."""
    return configured or (os.cpu_count() or 1) + 2


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minute of retries, when nothing listens at `address`."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.hostname is None or parsed.port is None:
        return
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=3).close()
    except OSError as exc:
        raise PipelineError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}): "
                            "start it (`ray start --head`) or fix scaling.address / RAY_ADDRESS") from None


@contextlib.contextmanager
def ray_connection(address: str | None, need_cpus: int, need_gpus: int, what: str, fix: str,
                   local_num_cpus: int | None = None):
    """Use an initialised Ray (tests, Ray jobs), connect to `address` / RAY_ADDRESS, or start a
    local Ray; check the job can ever be placed; shut down only what this call started."""
    import ray

    started = not ray.is_initialized()
    try:
        if started:
            address = address or os.environ.get("RAY_ADDRESS")
            if address:
                _check_reachable(address)
            else:
                # Decide before paying for a Ray start.
                _check_capacity({"CPU": local_cpus(local_num_cpus), "GPU": 0}, need_cpus,
                                need_gpus, what, f"{fix}, or set the local Ray's CPUs "
                                "(scaling.local_num_cpus / cluster.local_num_cpus)")
            # A stop signal during the start would leave half-started Ray processes behind; it
            # takes effect right after (and ray.init's own SIGTERM handler is replaced by ours).
            with signals_deferred():
                _init(address, local_num_cpus)
        _check_capacity(ray.cluster_resources(), need_cpus, need_gpus, what, fix)
        yield
    finally:
        if started:
            ray.shutdown()


def _init(address: str | None, local_num_cpus: int | None) -> None:
    import ray

    if address:
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PipelineError(f"cannot connect to the Ray cluster at {address} ({exc}): "
                                "start it or fix scaling.address / RAY_ADDRESS") from None
    else:
        ray.init(address="local", num_cpus=local_cpus(local_num_cpus), include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False)


def _check_capacity(total: dict, need_cpus: int, need_gpus: int, what: str, fix: str) -> None:
    """Fail fast when the cluster can never hold the job, instead of waiting forever."""
    problems = []
    if total.get("CPU", 0) < need_cpus:
        problems.append(f"{what} need {need_cpus} CPUs, the Ray cluster has {total.get('CPU', 0):g}")
    if need_gpus and total.get("GPU", 0) < need_gpus:
        problems.append(f"{what} need {need_gpus} GPUs, the Ray cluster has {total.get('GPU', 0):g}")
    if problems:
        raise PipelineError("; ".join(problems) + f": {fix}")
