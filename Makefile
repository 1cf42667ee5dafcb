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

.PHONY: help install run test test-fast lint bench constraints clean mlflow-ui prefect-ui \
        serve stop deploy retrain browser-deps system-deps dvc-remote stack-up stack-down \
        stack-config

help:
	@echo "make run        set up .venv and run the pipeline (dvc repro) on the demo data"
	@echo "make test       set up .venv and run lint + the whole test suite (CI runs this)"
	@echo "make test-fast  the suite without tests marked slow"
	@echo "make bench      model speed benchmark (images/s, training and inference)"
	@echo "make install    only set up .venv"
	@echo "make serve      Prefect server + worker and MLflow server on 127.0.0.1 (make stop)"
	@echo "make deploy     the scheduled retrain deployment (cron: params.yaml schedule:)"
	@echo "make retrain    one retrain run now (a flow run in the UI when the servers are up)"
	@echo "make stack-up   the team stack in Docker: Postgres, MinIO, MLflow, Prefect, worker"
	@echo "make dvc-remote DVC_REMOTE_URL=s3://...   DVC's default remote on S3 / MinIO"

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

# Servers for this project (infra/serve.sh, infra/stop.sh; settings in pipelines/ops/servers.py):
# the pipeline uses them while they are up, its embedded defaults (mlflow.db) when not.
serve: $(STAMP)
	PREFECT_PORT=$(PREFECT_PORT) MLFLOW_PORT=$(MLFLOW_PORT) PYTHON=$(BIN)/python infra/serve.sh

stop:
	PYTHON=$(BIN)/python infra/stop.sh

deploy: $(STAMP)
	$(BIN)/python -m pipelines deploy

retrain: $(STAMP)
	$(BIN)/python -m pipelines retrain

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) \
	  --default-artifact-root $(abspath mlartifacts) --host 127.0.0.1 --port $(MLFLOW_PORT)

prefect-ui: $(STAMP)
	PREFECT_HOME=$(abspath .prefect) $(BIN)/prefect server start --host 127.0.0.1 \
	  --port $(PREFECT_PORT)

# The team stack and scale-out (infra/, docs/infra.md). DVC's S3 remote, credentials from
# the environment only: make dvc-remote DVC_REMOTE_URL=s3://dvc/detr-ops [DVC_REMOTE_ENDPOINT=...]
dvc-remote: $(STAMP)
	DVC=$(abspath $(BIN))/dvc infra/dvc-remote.sh

stack-up:
	infra/stack.sh up -d --build --wait

stack-down:
	infra/stack.sh down

stack-config:
	infra/stack.sh config

lint: $(STAMP)
	$(BIN)/ruff check detr pipelines tests benchmarks

# Tests run in random order (pytest-randomly; the seed is printed: rerun an order with
# `pytest -p randomly --randomly-seed=N`, or in file order with `-p no:randomly`).
test: $(STAMP) lint system-deps
	$(BIN)/python -m pytest

# Debian packages the tests need, installed only when missing (apt-get update only then):
# chromium for the browser tests (Playwright never downloads a browser here), PostgreSQL's
# server for the team-stack tests (tests/infra: MLflow and Prefect servers on Postgres).
system-deps:
	@missing=""; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium chromium-driver"; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  if [ -n "$$missing" ]; then \
	    if command -v apt-get >/dev/null 2>&1; then \
	      SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	      echo "installing (apt):$$missing"; \
	      $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	        $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	    else echo "no apt-get: install$$missing yourself (browser tests skip, tests/infra fail)"; fi; \
	  fi

browser-deps: system-deps

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
