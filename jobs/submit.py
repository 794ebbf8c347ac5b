"""Run the pipeline's stages on a Ray cluster as Ray jobs (manage them with `jobs`: jobs/jobs_cmd.py).

    export RAY_API_SERVER_ADDRESS=http://head:8265       # the head node's dashboard (or --address)
    export RAY_AUTH_TOKEN=$(ssh head ray get-auth-token)  # clusters started with RAY_AUTH_MODE=token
    export MLFLOW_TRACKING_URI=http://mlflow:5000         # passed on to the job (credentials are not)

    lstm-pipeline submit --follow -- train -c conf/train.yaml scaling.num_workers=4 scaling.use_gpu=true
    lstm-pipeline submit --no-wait -- predict --model models:/lstm-classifier@current \\
        --input s3://bucket/seqs --output s3://bucket/predictions
    lstm-pipeline submit --address http://head:8265 -- data check s3://bucket/train
    python -m jobs.submit --follow -- train train.epochs=10

`submit` checks the stage's options and config here, ships this project as the job's
`working_dir` (pipeline/remote.py says what it leaves out), runs `python -m jobs.<stage> ARGS` on
the cluster, prints the job id on stdout and then waits: `--follow` also streams the logs,
`--no-wait` returns at once. It exits 0 when the job SUCCEEDED and 1 otherwise, with the job's
own error line.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from jobs.common import parse_stage, user_errors
from pipeline.errors import ConfigError
from pipeline.redact import redact
from pipeline.remote import (
    DEFAULT_ADDRESS,
    STAGES,
    Cluster,
    build_entrypoint,
    build_runtime_env,
    check_no_secrets,
    find_project_root,
    relative_path_warnings,
)

ADDRESS = click.option("--address", default=None, metavar="URL",
                       help="The head node's dashboard, e.g. http://head:8265. Default: "
                            "RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else " + DEFAULT_ADDRESS)


def check_stage(stage: str, args: list[str], root: Path, env) -> list[str]:
    """The stage's options and config, checked here before anything is uploaded (the job's own
    launcher builds the same config on the cluster); returns warnings about paths it cannot see."""
    params = parse_stage(stage, args)
    if stage == "train":
        from jobs.train import train_config

        # The job reads a relative -c from its copy of the project: check that copy's file.
        path = params.get("config_path")
        cfg = train_config(str(root / path) if path and not os.path.isabs(path) else path,
                           params.get("overrides", ()))
        named = {"data.train_path": cfg.data.train_path, "data.val_path": cfg.data.val_path,
                 "train.storage_path": cfg.train.storage_path}
    elif stage == "predict":
        from jobs.predict import predict_config

        cfg = predict_config(**{k: v for k, v in params.items() if k != "config_path"},
                             config_path=None)
        named = {"--input": cfg.predict.input_path, "--output": cfg.predict.output_path}
    else:
        return []
    return relative_path_warnings(named, cfg.tracking.tracking_uri or env.get("MLFLOW_TRACKING_URI"))


@click.command(context_settings={"help_option_names": ["-h", "--help"],
                                 "ignore_unknown_options": True, "allow_interspersed_args": False})
@ADDRESS
@click.option("--follow", is_flag=True, help="Stream the job's logs until it ends.")
@click.option("--no-wait", is_flag=True, help="Print the job id and return at once.")
@click.argument("stage", type=click.Choice(STAGES))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def submit(address: str | None, follow: bool, no_wait: bool, stage: str, args: tuple[str, ...]) -> None:
    """Run STAGE (train, predict, data) with ARGS as a Ray job on a cluster.

    \b
    lstm-pipeline submit --follow -- train -c conf/train.yaml scaling.num_workers=4
    lstm-pipeline submit --no-wait -- predict --model models:/lstm-classifier@current --input s3://b/in --output s3://b/out

    The job id goes to stdout; exit 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED.
    """
    if follow and no_wait:
        raise ConfigError("--follow and --no-wait exclude each other: pick one")
    root = find_project_root(Path.cwd())
    entrypoint = build_entrypoint(stage, args)
    check_no_secrets(entrypoint, os.environ)
    for warning in check_stage(stage, list(args), root, os.environ):
        click.echo(f"warning: {redact(warning)}", err=True)
    # Ray's packaging leaves out what the project's .gitignore files ignore, unless told not to.
    os.environ.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
    note = lambda line: click.echo(line, err=True)  # noqa: E731
    cluster = Cluster(address, note=note)
    job_id = cluster.submit(entrypoint, build_runtime_env(root, os.environ), stage)
    click.echo(job_id)
    note(f"submitted `{redact(entrypoint)}` to {cluster.address}")
    if no_wait:
        note(f"follow it with: lstm-pipeline jobs logs {job_id} --follow")
        return
    try:
        status = cluster.wait(job_id, follow, lambda chunk: click.echo(chunk, nl=False), note)
    except KeyboardInterrupt:
        note(f"stopped waiting; job {job_id} keeps running (lstm-pipeline jobs stop {job_id})")
        raise
    cluster.outcome(job_id, status)
    note(f"job {job_id} SUCCEEDED")


if __name__ == "__main__":
    submit()
