"""List, inspect, follow and stop the Ray jobs on a cluster (see jobs/submit.py for `submit`).

    lstm-pipeline jobs list --address http://head:8265
    lstm-pipeline jobs status raysubmit_XYZ         # SUCCEEDED, or FAILED: <the job's error line>
    lstm-pipeline jobs logs raysubmit_XYZ --follow
    lstm-pipeline jobs stop raysubmit_XYZ           # SIGTERM; a run stopped mid-training ends KILLED
    python -m jobs.jobs_cmd list

The address and token come from --address / RAY_API_SERVER_ADDRESS / RAY_ADDRESS and
RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / RAY_AUTH_MODE, as for `submit`.
"""

from __future__ import annotations

import time

import click

from jobs.common import user_errors
from jobs.submit import ADDRESS
from pipeline.remote import Cluster, failure_summary


@click.group("jobs", context_settings={"help_option_names": ["-h", "--help"]})
def jobs_cmd() -> None:
    """List, inspect, follow and stop Ray jobs on a cluster."""


@jobs_cmd.command("list")
@ADDRESS
@user_errors
def list_jobs(address: str | None) -> None:
    """Every job the cluster knows, oldest first."""
    cluster = Cluster(address)
    jobs = cluster.jobs()
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) \
            if job.start_time else "-"
        entry = job.entrypoint if len(job.entrypoint) <= 80 else job.entrypoint[:77] + "..."
        click.echo(f"{job.submission_id or job.job_id:<28} {str(job.status):<9} {started}  {entry}")
    if not jobs:
        click.echo(f"no jobs on {cluster.address}", err=True)


@jobs_cmd.command("status")
@click.argument("job_id")
@ADDRESS
@user_errors
def status(job_id: str, address: str | None) -> None:
    """The job's status, and its error when it failed."""
    cluster = Cluster(address)
    info = cluster.info(job_id)
    line = f"{job_id} {info.status}"
    if str(info.status) in ("FAILED", "STOPPED"):
        line += f": {failure_summary(info.message)}"
    click.echo(line)


@jobs_cmd.command("logs")
@click.argument("job_id")
@ADDRESS
@click.option("--follow", is_flag=True, help="Keep streaming until the job ends.")
@user_errors
def logs(job_id: str, address: str | None, follow: bool) -> None:
    """Print the job's logs (stdout and stderr of the entrypoint)."""
    cluster = Cluster(address)
    if follow:
        cluster.info(job_id)  # an unknown id is a clear error, not an empty stream
        cluster.stream_logs(job_id, lambda chunk: click.echo(chunk, nl=False))
    else:
        click.echo(cluster.logs(job_id), nl=False)


@jobs_cmd.command("stop")
@click.argument("job_id")
@ADDRESS
@user_errors
def stop(job_id: str, address: str | None) -> None:
    """Stop a running job: SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (30 s for jobs
    from `submit`). A training job stopped while it trains ends its MLflow run KILLED.
    """
    cluster = Cluster(address)
    if cluster.stop(job_id):
        click.echo(f"stopping job {job_id}")
    else:
        click.echo(f"job {job_id} already ended: {cluster.info(job_id).status}")


if __name__ == "__main__":
    jobs_cmd()
