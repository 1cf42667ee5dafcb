#!/usr/bin/env bash
# Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d/): one
# database per server, each owned by its own login role with its own password, so a leaked
# MLflow password does not open Prefect's database and neither is the superuser.
#
#   mlflow   MLflow tracking + model registry   (password: MLFLOW_DB_PASSWORD)
#   prefect  Prefect server                     (password: PREFECT_DB_PASSWORD)
#
# Idempotent (existing roles and databases are left alone), so it is also safe to run by hand
# against an existing server: PGHOST=... PGPORT=... POSTGRES_USER=postgres \
#   MLFLOW_DB_PASSWORD=... PREFECT_DB_PASSWORD=... infra/postgres/init-databases.sh
# Passwords are passed as psql variables and quoted by format(%L): any characters are safe.
set -euo pipefail

: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set (infra/.env)}"
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set (infra/.env)}"

create_owned_database() {  # name password
  psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
       --set=name="$1" --set=password="$2" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'name', :'password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'name') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'name', :'name')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'name') \gexec
SQL
  echo "init-databases: database '$1' owned by role '$1'"
}

create_owned_database mlflow "$MLFLOW_DB_PASSWORD"
create_owned_database prefect "$PREFECT_DB_PASSWORD"
