"""The `lstm-pipeline` command: one group over the stage launchers.

    lstm-pipeline data synth --out data/synth
    lstm-pipeline data check data/synth/train
    lstm-pipeline train -c conf/train.yaml scaling.num_workers=2
    lstm-pipeline predict --model models:/lstm-classifier@current --input data/synth/val --output predictions/val
    lstm-pipeline ui
"""

from __future__ import annotations

import click

from jobs.data import data
from jobs.jobs_cmd import jobs_cmd
from jobs.predict import predict
from jobs.submit import submit
from jobs.train import train
from jobs.ui import ui


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lstm-pipeline")
def main() -> None:
    """Train LSTM sequence classifiers on Ray and track them in MLflow."""


main.add_command(data)
main.add_command(train)
main.add_command(predict)
main.add_command(ui)
main.add_command(submit)
main.add_command(jobs_cmd)

if __name__ == "__main__":
    main()
