"""Train the LSTM classifier on Ray Train and track it in MLflow.

    lstm-pipeline train                                   # defaults (= conf/train.yaml)
    lstm-pipeline train -c conf/train.yaml model.hidden_size=128 scaling.num_workers=2
    python -m jobs.train -c conf/train.yaml train.epochs=10
    lstm-pipeline train --resume 3f2c... train.epochs=20   # continue a run from its last checkpoint
"""

from __future__ import annotations

import os
import shlex
import sys

import click

from jobs.common import quiet_libraries, user_errors


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
    from pipeline.config import TrainJobConfig, dump_yaml, load_config
    from pipeline.errors import ConfigError
    from pipeline.redact import redact
    from pipeline.train import run_training

    if resume_run_id:
        if config_path:
            raise ConfigError("--resume uses the config the run was trained with: drop -c and "
                              "pass changes as key=value overrides")
        cfg, text = config_for_resume(resume_run_id, list(overrides))
    else:
        cfg = load_config(TrainJobConfig, config_path, list(overrides))
        text = dump_yaml(cfg)
    command = " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0])] + sys.argv[1:])
    try:
        result = run_training(cfg, config_text=text, command=command, config_path=config_path,
                              resume_run_id=resume_run_id, console=click.echo)
    except NothingToDo as done:
        click.echo(str(done))  # the run, its versions and the alias stay as they were
        return
    click.echo("")
    click.echo(f"run id:          {result.run_id}")
    if result.version:
        alias = f" (alias @{cfg.tracking.alias})" if cfg.tracking.alias else ""
        click.echo(f"registered:      models:/{result.registered_name}/{result.version}{alias}")
    click.echo(f"model:           {result.model_uri}")
    if "val_rmse" in result.val_metrics:
        m = result.val_metrics
        click.echo(f"val RMSE:        {m['val_rmse']:.4f}  MAE {m['val_mae']:.4f}  R2 {m['val_r2']:.4f} "
                   f"(best val_loss {result.val_loss:.4f})")
    else:
        click.echo(f"val accuracy:    {result.val_accuracy:.4f} (best val_loss {result.val_loss:.4f})")
    shown = redact(result.tracking_uri)
    ui = "lstm-pipeline ui" if result.tracking_uri.startswith("sqlite:") else f"open {shown}"
    click.echo(f"open the UI:     {ui}"
               + (f" --tracking-uri {shown}" if ui == "lstm-pipeline ui"
                  and result.tracking_uri != _default_uri() else ""))


def _default_uri() -> str:
    from pipeline.tracking import resolve_tracking_uri

    return resolve_tracking_uri(None)


if __name__ == "__main__":
    train()
