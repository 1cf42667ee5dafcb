#!/usr/bin/env bash
# `make stop`: stop what `make serve` started for this project (the worker first, with any
# flow run it started; SIGTERM, then SIGKILL after 20 s). Idempotent. Same SERVE_DIR as serve.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m pipelines.ops.servers stop
