"""Make and check Parquet sequence shards.

    lstm-pipeline data synth --out data/synth                  # train/ and val/ shards
    lstm-pipeline data synth --out data/big --rows 100000 --max-length 200 --overwrite
    lstm-pipeline data check data/synth/train                  # every row; exit 2 when invalid
    lstm-pipeline data prepare --input readings.csv --out data/readings --id-col id --time-col t \
        --label-col state                                      # a table of readings -> shards
    python -m jobs.data check data/synth/val
"""

from __future__ import annotations

import click

from jobs.common import user_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def data() -> None:
    """Make a synthetic dataset or validate shards."""


@data.command()
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory to create; shards go to OUT/train and OUT/val.")
@click.option("--rows", default=8000, show_default=True, help="Training sequences.")
@click.option("--val-rows", default=2000, show_default=True, help="Validation sequences.")
@click.option("--features", "n_features", default=8, show_default=True, help="Features per time step.")
@click.option("--classes", "num_classes", default=4, show_default=True, help="Number of classes.")
@click.option("--min-length", default=10, show_default=True, help="Shortest sequence (time steps).")
@click.option("--max-length", default=40, show_default=True,
              help="Longest sequence; equal to --min-length for fixed-length data.")
@click.option("--marker-steps", default=3, show_default=True,
              help="Leading steps that carry the class pattern; the rest is noise.")
@click.option("--signal", default=1.0, show_default=True, help="Amplitude of the class pattern.")
@click.option("--noise", default=1.0, show_default=True, help="Standard deviation of the noise.")
@click.option("--shards", default=4, show_default=True, help="Parquet files per split.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same files).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if an earlier run of this project wrote it.")
@user_errors
def synth(out, rows, val_rows, n_features, num_classes, min_length, max_length, marker_steps,
          signal, noise, shards, seed, overwrite) -> None:
    """Write a learnable synthetic dataset: class patterns at the start, noise after.

    A model must remember the first steps across the rest of each sequence to beat chance.
    """
    from pipeline.synth import SynthSpec, write_synthetic

    spec = SynthSpec(rows=rows, val_rows=val_rows, n_features=n_features, num_classes=num_classes,
                     min_length=min_length, max_length=max_length, marker_steps=marker_steps,
                     signal=signal, noise=noise, shards=shards, seed=seed)
    counts = write_synthetic(out, spec, overwrite=overwrite)
    click.echo(f"wrote {counts.get('train', 0)} training and {counts.get('val', 0)} validation "
               f"sequences ({n_features} features, {num_classes} classes, lengths "
               f"{min_length}-{max_length}) to {out}")


def _columns(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


@data.command()
@click.option("--input", "inputs", required=True, multiple=True,
              help="The long-format table: CSV or Parquet files or directories (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory to create: OUT/train, OUT/val shards and OUT/dataset.json.")
@click.option("--id-col", required=True, help="Sequence id column.")
@click.option("--time-col", required=True, help="Time step column (sorted within each sequence).")
@click.option("--feature-cols", help="Comma-separated numeric feature columns "
                                     "(default: every numeric column but id, time and label).")
@click.option("--label-col", help="Per-sequence label: strings (class names), integers (class "
                                  "indices) or floats (regression).")
@click.option("--val-fraction", default=0.2, show_default=True,
              help="Fraction of sequence ids held out for validation (seeded).")
@click.option("--shards", default=4, show_default=True,
              help="Parquet files per split; memory use is about one shard's rows.")
@click.option("--missing", type=click.Choice(["error", "ffill", "drop"]), default="error",
              show_default=True, help="Missing feature values: fail, fill forward within the "
                                      "sequence, or drop the rows.")
@click.option("--window", type=int, help="Forecasting: past steps per example.")
@click.option("--horizon", default=1, show_default=True,
              help="Forecasting: predict the next H values of --target-col (H outputs).")
@click.option("--target-col", help="Forecasting: column to forecast (default: the only feature).")
@click.option("--stride", default=1, show_default=True,
              help="Forecasting: steps between consecutive windows.")
@click.option("--seed", default=0, show_default=True, help="Seed of the train/validation split.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if an earlier run of this project wrote it.")
@user_errors
def prepare(inputs, out, id_col, time_col, feature_cols, label_col, val_fraction, shards, missing,
            window, horizon, target_col, stride, seed, overwrite) -> None:
    """Turn a table of readings (one row per sequence id and time step) into sequence shards.

    Rows are sorted by time within each sequence and split into train/validation by sequence id.
    String labels become class indices; the names are kept in OUT/dataset.json and in the shards,
    and training stores them with the model. With --window L --horizon H each series becomes
    forecasting examples: L past steps -> the next H values of --target-col.
    """
    from pipeline.prepare import PrepareSpec
    from pipeline.prepare import prepare as run_prepare

    spec = PrepareSpec(input=list(inputs), out=out, id_col=id_col, time_col=time_col,
                       feature_cols=_columns(feature_cols), label_col=label_col,
                       val_fraction=val_fraction, shards=shards, seed=seed, missing=missing,
                       window=window, horizon=horizon, target_col=target_col, stride=stride,
                       overwrite=overwrite)
    for line in run_prepare(spec).summary_lines():
        click.echo(line)


@data.command()
@click.argument("name", required=False)
@click.option("--out", type=click.Path(file_okay=False),
              help="Directory to create: OUT/train (the archive's TRAIN split), OUT/val (TEST).")
@click.option("--list", "list_names", is_flag=True, help="List the datasets the aeon wheel ships.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if an earlier run of this project wrote it.")
@user_errors
def uea(name, out, list_names, overwrite) -> None:
    """Real UEA/UCR classification data from the files shipped inside the aeon wheel (the `uea`
    extra); nothing is downloaded. E.g. `data uea JapaneseVowels --out data/vowels`."""
    from pipeline.errors import DataError
    from pipeline.uea import shipped_names, write_uea

    if list_names:
        click.echo("\n".join(shipped_names()))
        return
    if not name or not out:
        raise DataError("give a dataset NAME and --out DIR (see --list for the names)")
    facts = write_uea(name, out, overwrite)
    classes = (f"{len(facts['class_names'])} classes: {', '.join(facts['class_names'])}"
               if facts["class_names"] else "regression targets; train with model.task=regression")
    click.echo(f"wrote {facts['examples']['train']} training and {facts['examples']['val']} "
               f"validation sequences of {name} ({len(facts['features'])} channels, {classes}) "
               f"to {out}")


@data.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--features-column", default="features", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--no-label", is_flag=True, help="Unlabelled data (for prediction): skip label checks.")
@click.option("--regression", is_flag=True,
              help="Labels are regression targets (a number or a list of numbers per row).")
@click.option("--num-classes", type=int, default=None, help="Also check labels are below this.")
@click.option("--sample", "sample_rows", type=int, default=None,
              help="Check only the first N rows of each file (default: every row).")
@user_errors
def check(paths, features_column, label_column, no_label, regression, num_classes,
          sample_rows) -> None:
    """Validate shards (directories, globs or files) and print a summary."""
    from pipeline.shards import check_shards

    for line in check_shards(list(paths), features_column=features_column,
                             label_column=None if no_label else label_column,
                             regression=regression, num_classes=num_classes, sample_rows=sample_rows):
        click.echo(line)


if __name__ == "__main__":
    data()
