# Two commands do all the set-up on a fresh machine with Python >= 3.10:
#   make demo   # venv, synthetic data if missing, train on a local Ray, MLflow in ./mlflow.db
#   make test   # venv with the dev extra, then the test suite
# PYTHON=python3.12 picks the interpreter; TORCH='torch==2.5.1' (or 'torch') picks the PyTorch
# build installed before the project (the project itself accepts torch>=2.4,<3).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
DATA   ?= data/synth
PYTEST_ARGS ?=

.PHONY: demo test install install-dev ui clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Torch goes first so the project's range is already satisfied by the chosen build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install "$(TORCH)"
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	@test -d $(DATA)/train || $(BIN)/lstm-pipeline data synth --out $(DATA)
	$(BIN)/lstm-pipeline train -c conf/train.yaml data.train_path=$(DATA)/train data.val_path=$(DATA)/val

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

ui: install
	$(BIN)/lstm-pipeline ui

clean:
	rm -rf mlflow.db mlartifacts mlruns ray_results $(DATA)
