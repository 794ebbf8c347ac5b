"""Batch-predict Parquet shards with a registered model; Parquet predictions out.

    lstm-pipeline predict --model models:/lstm-classifier@current --input data/synth/val --output predictions/val
    lstm-pipeline predict --model lstm-classifier --input 's3://bucket/seqs/*.parquet' --output s3://bucket/preds \
        predict.num_actors=4 predict.batch_size=2048
    python -m jobs.predict -c conf/predict.yaml --model models:/lstm-classifier/3 --input in/ --output out/ --overwrite
"""

from __future__ import annotations

import sys

import click

from jobs.common import command_line, quiet_libraries, user_errors


def predict_config(config_path: str | None, model: str | None, input_path, output_path: str | None,
                   overwrite: bool | None, overrides):
    """The predict config of a `-c` file (optional), the flags and KEY=VALUE overrides."""
    from pipeline.config import PredictJobConfig, load_config

    flags = {"predict.model": model,
             "predict.input_path": (list(input_path) if len(input_path) > 1 else input_path[0])
             if input_path else None,
             "predict.output_path": output_path,
             "predict.overwrite": overwrite}
    return load_config(PredictJobConfig, config_path, list(overrides),
                       values={k: v for k, v in flags.items() if v is not None})


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config (sections predict, data, cluster, tracking); default built-ins "
                   "(the same as conf/predict.yaml).")
@click.option("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a model "
                              "directory, or a registered NAME (its newest version).")
@click.option("--input", "input_path", multiple=True,
              help="Shards: a directory, glob or file (local or URI); repeat for several.")
@click.option("--output", "output_path", help="Directory to create with the predictions.")
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace an existing --output that an earlier predict wrote.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@user_errors
def predict(config_path, model, input_path, output_path, overwrite, overrides) -> None:
    """Predict every row of the input with the model; write id, prediction, probabilities.

    The output has one row per input row: the passthrough columns (default: id, and label when
    present), `prediction` (class index), `label_name` when the model knows class names, and
    `probabilities` (list<float32>). With labels in the input, the MLflow run also gets the
    accuracy, per-class precision/recall and a confusion matrix. A regression model writes
    `prediction` as a double (list<double> for a multi-step forecast) and logs MAE, RMSE, R^2.
    """
    quiet_libraries(progress_bars=sys.stderr.isatty())  # Ray Data's bars, on a terminal only
    from pipeline.predict import run_prediction

    cfg = predict_config(config_path, model, input_path, output_path, overwrite, overrides)
    run_prediction(cfg, command=command_line(), config_path=config_path, console=click.echo)


if __name__ == "__main__":
    predict()
