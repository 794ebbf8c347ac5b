"""lstm-pipeline: distributed LSTM training on Ray Train with MLflow tracking."""

__version__ = "0.1.0"
