#!/usr/bin/env bash
# Docker Compose for the team stack (infra/compose.yaml), with the checks compose can't do:
# infra/.env must exist and hold no change-me placeholder. Any compose arguments pass through.
#
#   infra/stack.sh up -d --build --wait      (make stack-up)
#   infra/stack.sh down                      (make stack-down; volumes are kept)
#   infra/stack.sh config                    (the rendered configuration; needs no engine)
#   STACK_GPU=1 infra/stack.sh up -d ...     the worker gets the NVIDIA GPUs (compose.gpu.yaml)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
env_file=${STACK_ENV_FILE:-$here/.env}
die() { echo "stack: $*" >&2; exit 2; }

[[ -f $env_file ]] || die "$env_file not found: cp infra/.env.example infra/.env and set every value"
if left=$(grep -E '^[A-Z0-9_]+=change-me$' "$env_file"); then
  die "$env_file still has placeholder values: $(echo "$left" | cut -d= -f1 | tr '\n' ' ')"
fi

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
else
  die "Docker Compose v2 not found (the docker CLI plugin, or docker-compose on PATH)"
fi
files=(-f "$here/compose.yaml")
[[ ${STACK_GPU:-0} == 1 ]] && files+=(-f "$here/compose.gpu.yaml")
exec "${compose[@]}" "${files[@]}" --env-file "$env_file" "$@"
