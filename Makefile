# One machine, two commands: `make run` (the pipeline on the demo data) and `make test`.
# Every target sets up .venv itself: Python 3.11, pinned dependencies (constraints.txt).

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

MLFLOW_PORT  ?= 5000
PREFECT_PORT ?= 4200

.PHONY: help install run test test-fast lint bench constraints clean mlflow-ui prefect-ui

help:
	@echo "make run        set up .venv and run the pipeline (dvc repro) on the demo data"
	@echo "make test       set up .venv and run lint + the whole test suite (CI runs this)"
	@echo "make test-fast  the suite without tests marked slow"
	@echo "make bench      model speed benchmark (images/s, training and inference)"
	@echo "make install    only set up .venv"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

install: $(STAMP)

# The stages run `python -m pipelines ...`: the venv's python must come first on PATH.
run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@$(BIN)/python -m pipelines summary

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) \
	  --default-artifact-root $(abspath mlartifacts) --host 127.0.0.1 --port $(MLFLOW_PORT)

prefect-ui: $(STAMP)
	PREFECT_HOME=$(abspath .prefect) $(BIN)/prefect server start --host 127.0.0.1 \
	  --port $(PREFECT_PORT)

lint: $(STAMP)
	$(BIN)/ruff check detr pipelines tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/model_speed.py

constraints: $(STAMP)
	{ echo "# The whole resolved dependency set, pinned (pip install -c constraints.txt)."; \
	  echo "# Regenerate with \`make constraints\` after changing pyproject.toml."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -viE "^(-e|detr-ops)"; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
