"""Make and check Parquet sequence shards.

    lstm-pipeline data synth --out data/synth                  # train/ and val/ shards
    lstm-pipeline data synth --out data/big --rows 100000 --max-length 200 --overwrite
    lstm-pipeline data check data/synth/train                  # every row; exit 2 when invalid
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
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
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


@data.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--features-column", default="features", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--no-label", is_flag=True, help="Unlabelled data (for prediction): skip label checks.")
@click.option("--num-classes", type=int, default=None, help="Also check labels are below this.")
@click.option("--sample", "sample_rows", type=int, default=None,
              help="Check only the first N rows of each file (default: every row).")
@user_errors
def check(paths, features_column, label_column, no_label, num_classes, sample_rows) -> None:
    """Validate shards (directories, globs or files) and print a summary."""
    from pipeline.config import DataConfig
    from pipeline.data import inspect_files, list_shards
    from pipeline.errors import DataError, collect

    cfg = DataConfig(train_path=list(paths), val_path=None, val_fraction=0.5,
                     features_column=features_column, label_column=label_column,
                     num_classes=num_classes, sample_rows=sample_rows or 1)
    files = list_shards(list(paths), "data")
    info = inspect_files(files, cfg, "data", need_label=not no_label, full_scan=sample_rows is None)
    problems = list(info.problems)
    if num_classes is not None and info.label_max is not None and info.label_max >= num_classes:
        problems.append(f"label {info.label_max} is out of range for {num_classes} classes")
    collect(problems, DataError, "the data")
    pct = info.length_percentiles()
    click.echo(f"files:       {len(files)}")
    click.echo(f"rows:        {info.rows}")
    click.echo(f"n_features:  {info.n_features}")
    click.echo("lengths:     " + "  ".join(f"p{q}={v}" if q < 100 else f"max={v}" for q, v in pct.items())
               + ("" if sample_rows is None else f"  (first {sample_rows} rows per file)"))
    if info.class_counts:
        click.echo("classes:     " + "  ".join(f"{k}:{v}" for k, v in sorted(info.class_counts.items())))
    elif not no_label:
        click.echo(f"labels:      {info.label_min}..{info.label_max}")
    click.echo("ok")


if __name__ == "__main__":
    data()
