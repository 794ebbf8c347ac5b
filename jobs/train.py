"""Train the LSTM classifier on Ray Train and track it in MLflow.

    lstm-pipeline train                                   # defaults (= conf/train.yaml)
    lstm-pipeline train -c conf/train.yaml model.hidden_size=128 scaling.num_workers=2
    python -m jobs.train -c conf/train.yaml train.epochs=10
    lstm-pipeline train --resume 3f2c... train.epochs=20   # continue a run from its last checkpoint
"""

from __future__ import annotations

import click

from jobs.common import command_line, quiet_libraries, user_errors


def train_config(config_path: str | None, overrides):
    """The training config of a `-c` file (optional) and KEY=VALUE overrides."""
    from pipeline.config import TrainJobConfig, load_config

    return load_config(TrainJobConfig, config_path, list(overrides))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config (sections data, model, train, scaling, tracking). "
                   "Without it the built-in defaults apply (the same as conf/train.yaml).")
@click.option("--resume", "resume_run_id", metavar="RUN_ID",
              help="Continue this MLflow run (stopped, crashed or finished) from its latest "
                   "checkpoint with the config it was trained with plus the overrides, e.g. "
                   "train.epochs=20; logs into the same run.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@user_errors
def train(config_path: str | None, resume_run_id: str | None, overrides: tuple[str, ...]) -> None:
    """Train on the configured Parquet shards; log the run and register the model in MLflow.

    OVERRIDES are dotted config keys, e.g. model.hidden_size=128 scaling.num_workers=4
    data.train_path=s3://bucket/train tracking.tracking_uri=http://mlflow:5000
    """
    quiet_libraries()
    from pipeline.checkpoints import NothingToDo, config_for_resume
    from pipeline.config import dump_yaml
    from pipeline.errors import ConfigError
    from pipeline.train import run_training

    if resume_run_id and config_path:
        raise ConfigError("--resume uses the config the run was trained with: drop -c and pass "
                          "changes as key=value overrides")
    if resume_run_id:
        cfg, text = config_for_resume(resume_run_id, list(overrides))
    else:
        cfg = train_config(config_path, overrides)
        text = dump_yaml(cfg)
    try:
        result = run_training(cfg, config_text=text, command=command_line(), config_path=config_path,
                              resume_run_id=resume_run_id, console=click.echo)
    except NothingToDo as done:
        click.echo(str(done))  # the run, its versions and the alias stay as they were
        return
    click.echo("")
    for line in result.summary_lines():
        click.echo(line)


if __name__ == "__main__":
    train()
