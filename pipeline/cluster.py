"""Connecting to Ray: a running one, a cluster address, or a local Ray sized for the job."""

from __future__ import annotations

import contextlib
import logging
import os

from pipeline.errors import PipelineError


@contextlib.contextmanager
def ray_connection(address: str | None, need_cpus: int, local_num_cpus: int | None = None):
    """Use an initialised Ray (tests, Ray jobs), connect to `address` / RAY_ADDRESS, or start a
    local Ray; shut down only what this call started."""
    import ray

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            try:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise PipelineError(f"cannot connect to the Ray cluster at {address} ({exc}): "
                                    "start it or fix the address / RAY_ADDRESS") from None
        else:
            # Ray Data's read tasks need CPUs beside the training workers or predict actors, or
            # the data stage waits forever; logical CPUs above the physical count are fine for
            # those light tasks.
            num_cpus = local_num_cpus or max(os.cpu_count() or 1, need_cpus + 2)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     logging_level=logging.ERROR, log_to_driver=False)
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def check_resources(need_cpus: int, need_gpus: int, what: str, fix: str) -> None:
    """Fail fast when the cluster can never hold the job, instead of waiting forever."""
    import ray

    total = ray.cluster_resources()
    problems = []
    if total.get("CPU", 0) < need_cpus:
        problems.append(f"{what} need {need_cpus} CPUs, the Ray cluster has {total.get('CPU', 0):g}")
    if need_gpus and total.get("GPU", 0) < need_gpus:
        problems.append(f"{what} need {need_gpus} GPUs, the Ray cluster has {total.get('GPU', 0):g}")
    if problems:
        raise PipelineError("; ".join(problems) + f": {fix}")
