"""infra/compose.yaml as Docker Compose v2 renders it (``docker compose config``: the compose
specification's schema, interpolation, merge of the GPU override). No engine runs here, so
these checks stop short of starting containers; tests/infra/test_team_servers.py runs the
services' own commands and settings against real PostgreSQL and S3 servers instead."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.infra.conftest import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    INFRA,
    ROOT,
    SECRET_VARS,
    compose_config,
    example_env,
    write_env,
)

SERVICES = {"postgres", "minio", "s3-init", "mlflow", "prefect-server", "worker"}
SENSITIVE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$|_KEY_ID$", re.I)


def test_services_present_and_images_pinned(rendered):
    assert set(rendered["services"]) == SERVICES
    for name, service in rendered["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"
    app = {"s3-init", "mlflow", "prefect-server", "worker"}
    assert {rendered["services"][s]["build"]["dockerfile"] for s in app} == {"infra/Dockerfile"}
    assert set(rendered["volumes"]) >= {"postgres-data", "minio-data"}


def test_every_port_is_bound_to_loopback(rendered):
    published = []
    for name, service in rendered["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name}: {port} is not on 127.0.0.1"
            published.append(int(port["published"]))
    assert sorted(published) == [4200, 5000, 5432, 9000, 9001]


def test_ports_are_configurable(tmp_path, stack_env):
    env = write_env(tmp_path / "e", {**stack_env, "MLFLOW_PORT": "15000",
                                     "PREFECT_PORT": "14200"})
    done = compose_config(env)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert services["mlflow"]["ports"][0]["published"] == "15000"
    assert services["prefect-server"]["ports"][0]["published"] == "14200"
    # The UI in the host's browser must call the API on the published port.
    assert services["prefect-server"]["environment"]["PREFECT_UI_API_URL"] == \
        "http://127.0.0.1:14200/api"


def test_dependencies_wait_for_health(rendered):
    services = rendered["services"]
    for name in ("postgres", "minio", "mlflow", "prefect-server", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["s3-init"]["condition"] == \
        "service_completed_successfully"
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {k: v["condition"] for k, v in services["worker"]["depends_on"].items()} == \
        {"prefect-server": "service_healthy", "mlflow": "service_healthy"}


@pytest.mark.parametrize("var", SECRET_VARS + ("POSTGRES_USER", "MINIO_ROOT_USER"))
def test_a_missing_credential_stops_compose_naming_it(tmp_path, stack_env, var):
    env = write_env(tmp_path / "e", {k: v for k, v in stack_env.items() if k != var})
    done = compose_config(env)
    assert done.returncode != 0
    assert f"required variable {var} is missing a value" in done.stderr
    assert "infra/.env" in done.stderr


def test_secrets_come_only_from_the_env_file(rendered, stack_env):
    """Every password reaching a container is the env file's value (so nothing else could be
    its source), and the compose file itself holds no literal credential."""
    text = COMPOSE_FILE.read_text()
    for var in SECRET_VARS:
        assert f"${{{var}:?" in text, f"{var} must be required with ${{{var}:?...}}"
    seen = set()
    for name, service in rendered["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SENSITIVE.search(key):
                assert value in stack_env.values(), f"{name}.{key} is not from the env file"
                seen.add(value)
            for var in SECRET_VARS:
                if stack_env[var] in str(value):
                    seen.add(stack_env[var])
        command = " ".join(service.get("command") or [])
        for var in SECRET_VARS:  # passwords stay off command lines (visible in ps / inspect)
            assert stack_env[var] not in command, f"{name}: {var} on its command line"
    assert {stack_env[v] for v in SECRET_VARS} <= seen
    raw = yaml.safe_load(text)
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SENSITIVE.search(key):
                assert str(value).startswith("${"), f"{name}.{key}: literal value in compose"


def test_env_example_is_placeholders_and_env_is_ignored():
    values = example_env()
    for var in SECRET_VARS:
        assert values[var] == "change-me", f"{var} in .env.example must be a placeholder"
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    assert required <= set(values), f"not in .env.example: {required - set(values)}"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "infra/.env must be git-ignored"


def test_example_env_renders_as_is(tmp_path):
    """The committed example is complete: compose accepts it unchanged (stack.sh is what
    refuses to start while a change-me value is left)."""
    done = compose_config(ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr


def test_services_are_wired_to_each_other(rendered, stack_env):
    s = rendered["services"]
    mlflow_env = s["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"] == (
        f"postgresql+psycopg2://mlflow:{stack_env['MLFLOW_DB_PASSWORD']}@postgres:5432/mlflow")
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "s3://mlflow/artifacts" in s["mlflow"]["command"]
    assert "--serve-artifacts" in s["mlflow"]["command"]
    prefect_env = s["prefect-server"]["environment"]
    assert prefect_env["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert prefect_env["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    worker = s["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    pool = yaml.safe_load((ROOT / "params.yaml").read_text())["schedule"]["work_pool"]
    assert worker["command"][worker["command"].index("--pool") + 1] == pool
    assert worker["volumes"][0]["source"] == str(ROOT)
    assert s["s3-init"]["command"][-2:] == ["mlflow", "dvc"]


def test_gpu_override_reserves_gpus_for_the_worker(tmp_path, stack_env):
    env = write_env(tmp_path / "e", stack_env)
    done = compose_config(env, COMPOSE_FILE, INFRA / "compose.gpu.yaml")
    assert done.returncode == 0, done.stderr
    worker = yaml.safe_load(done.stdout)["services"]["worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == -1  # "all"
    assert worker["shm_size"]


def test_schema_errors_are_caught(tmp_path, stack_env):
    """The check can fail: a misspelt key is rejected by the compose schema."""
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("healthcheck:", "healthchek:", 1))
    done = compose_config(write_env(tmp_path / "e", stack_env), broken)
    assert done.returncode != 0 and "healthchek" in done.stderr
