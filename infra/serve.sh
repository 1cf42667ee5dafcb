#!/usr/bin/env bash
# `make serve`: the Prefect server (UI + API), its process worker and the MLflow tracking server
# (UI), on 127.0.0.1, for this project. Idempotent: what is already up is left as it is.
# Settings (environment or make variables): PREFECT_PORT (4200), MLFLOW_PORT (5000),
# SERVE_HOST (127.0.0.1), PREFECT_DATA (.prefect), MLFLOW_DB (mlflow.db),
# MLFLOW_ARTIFACTS (mlartifacts), SERVE_DIR (.servers: pid files, logs, state.json),
# SERVE_TIMEOUT_S (180). The work pool is params.yaml's schedule.work_pool.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
exec "$PYTHON" -m pipelines.ops.servers start
