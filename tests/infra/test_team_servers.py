"""The compose stack's services, run from what infra/compose.yaml says, without containers.

No Docker engine here, so each service's *command and environment*, as Docker Compose renders
them from the env file, are started as local processes against real servers: PostgreSQL
(Debian's package, a throwaway cluster, password auth over TCP) stands in for the postgres
container, moto's S3 server for MinIO. Only the host names and ports are rewritten (the compose
network's ``postgres:5432`` / ``minio:9000`` become the loopback ports), and MLflow runs one
worker process instead of four. This checks for real:

- infra/postgres/init-databases.sh creates the two databases and their owners;
- the s3-init step creates the buckets;
- the MLflow server on Postgres + S3: a run with metrics, a model logged through the
  artifact proxy into the bucket, a registered version with the @champion alias, all read back;
- the Prefect server on Postgres; the Kubernetes GPU work pool created by ``prefect work-pool
  create``; a deployment's flow run rendered by prefect-kubernetes into the Job the worker
  would submit, valid against the Kubernetes schema; the compose worker's command registering
  with the server.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.ops import deploy
from tests.infra.conftest import (
    INFRA,
    Postgres,
    free_port,
    psql,
    stop,
    wait_http,
)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TEMPLATE = INFRA / "k8s" / "work-pool-gpu.json"


def _local(service: dict, pg: Postgres, s3_endpoint: str) -> tuple[list[str], dict[str, str]]:
    """A compose service's command and environment, pointed at the loopback servers."""

    def rewrite(value: str) -> str:
        return (str(value).replace("@postgres:5432/", f"@127.0.0.1:{pg.port}/")
                .replace("http://minio:9000", s3_endpoint))

    env = {k: rewrite(v) for k, v in (service.get("environment") or {}).items()}
    if env.get("PREFECT_SERVER_DATABASE_HOST") == "postgres":
        env.update(PREFECT_SERVER_DATABASE_HOST="127.0.0.1",
                   PREFECT_SERVER_DATABASE_PORT=str(pg.port))
    command = [rewrite(a) for a in service["command"]]
    if command[0] in ("mlflow", "prefect"):
        command[0] = str(BIN / command[0])
    elif command[0] == "python":  # the image's copy of infra/ is this checkout's
        command = [sys.executable] + [a.replace("/opt/detr-ops/infra/", f"{INFRA}/")
                                      for a in command[1:]]
    return command, env


def _clean_environ(home: Path) -> dict[str, str]:
    """This process's environment without settings that would point clients elsewhere."""
    drop = ("MLFLOW_", "PREFECT_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _serve(command: list[str], env: dict, log: Path, url: str, timeout_s: float
           ) -> subprocess.Popen:
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    wait_http(url, timeout_s, proc, log)
    return proc


def _with_listen(command: list[str], port: int) -> list[str]:
    """``--host 0.0.0.0 --port N`` (the container's) -> 127.0.0.1 and a free port."""
    command = list(command)
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    return command


@pytest.fixture(scope="module")
def databases(postgres, stack_env) -> Postgres:
    done = subprocess.run([str(INFRA / "postgres" / "init-databases.sh")],
                          env={**os.environ, **postgres.env,
                               "PATH": f"{postgres.bindir}:{os.environ['PATH']}",
                               "MLFLOW_DB_PASSWORD": stack_env["MLFLOW_DB_PASSWORD"],
                               "PREFECT_DB_PASSWORD": stack_env["PREFECT_DB_PASSWORD"]},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return postgres


@pytest.fixture(scope="module")
def buckets(rendered, databases, s3_server) -> None:
    command, env = _local(rendered["services"]["s3-init"], databases, s3_server.endpoint)
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]} >= {"mlflow", "dvc"}


@pytest.fixture(scope="module")
def mlflow_url(rendered, databases, buckets, s3_server, tmp_path_factory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("mlflow-home")
    command, env = _local(rendered["services"]["mlflow"], databases, s3_server.endpoint)
    port = free_port()
    env = {**_clean_environ(home), **env, "MLFLOW_WORKERS": "1"}
    proc = _serve(_with_listen(command, port), env, home / "mlflow.log",
                  f"http://127.0.0.1:{port}/health", 180)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prefect_url(rendered, databases, s3_server, tmp_path_factory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("prefect-home")
    command, env = _local(rendered["services"]["prefect-server"], databases, s3_server.endpoint)
    port = free_port()
    env = {**_clean_environ(home), **env, "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    proc = _serve(_with_listen(command, port), env, home / "prefect.log",
                  f"http://127.0.0.1:{port}/api/health", 240)
    try:
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(proc)


def test_init_script_creates_owned_databases(databases, stack_env):
    owners = psql(databases, "SELECT datname || ':' || pg_get_userbyid(datdba) FROM pg_database"
                             " WHERE datname IN ('mlflow', 'prefect') ORDER BY 1")
    assert owners.split() == ["mlflow:mlflow", "prefect:prefect"]
    # Each role logs in with its own password over TCP, and only into its own database.
    assert psql(databases, "SELECT current_user", user="mlflow",
                password=stack_env["MLFLOW_DB_PASSWORD"], db="mlflow") == "mlflow"
    with pytest.raises(RuntimeError, match="permission denied|authentication failed"):
        psql(databases, "SELECT 1", user="mlflow", password=stack_env["MLFLOW_DB_PASSWORD"],
             db="prefect")
    with pytest.raises(RuntimeError, match="authentication failed"):
        psql(databases, "SELECT 1", user="prefect", password="wrong", db="prefect")


def test_init_script_is_idempotent(databases, stack_env):
    again = subprocess.run([str(INFRA / "postgres" / "init-databases.sh")],
                           env={**os.environ, **databases.env,
                                "PATH": f"{databases.bindir}:{os.environ['PATH']}",
                                "MLFLOW_DB_PASSWORD": "other", "PREFECT_DB_PASSWORD": "other"},
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    # Existing roles keep their passwords.
    assert psql(databases, "SELECT 1", user="prefect",
                password=stack_env["PREFECT_DB_PASSWORD"], db="prefect") == "1"


class Doubler:
    """A tiny pyfunc model: enough to put real model files through the artifact proxy."""

    def predict(self, context, model_input, params=None):  # noqa: ARG002 (pyfunc signature)
        return model_input * 2


def test_mlflow_server_on_postgres_and_s3(mlflow_url, databases, stack_env, s3_server):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.pyfunc import PythonModel

    class Model(Doubler, PythonModel):
        pass

    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    experiment = client.create_experiment(f"infra-{uuid.uuid4().hex[:8]}")
    mlflow.set_tracking_uri(mlflow_url)
    mlflow.set_registry_uri(mlflow_url)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_params({"backbone": "resnet18", "epochs": 6})
            for step, ap in enumerate([0.01, 0.05, 0.12]):
                mlflow.log_metric("AP", ap, step=step)
            mlflow.log_metric("AR_100", 0.3)
            info = mlflow.pyfunc.log_model(name="model", python_model=Model(),
                                           pip_requirements=["pandas"])
        name = f"detr-infra-{uuid.uuid4().hex[:8]}"
        version = mlflow.register_model(info.model_uri, name)
        client.set_registered_model_alias(name, "champion", version.version)

        back = client.get_run(run.info.run_id)
        assert back.data.metrics == {"AP": 0.12, "AR_100": 0.3}
        assert [m.value for m in client.get_metric_history(run.info.run_id, "AP")] == \
            [0.01, 0.05, 0.12]
        assert back.data.params == {"backbone": "resnet18", "epochs": "6"}
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.version == version.version and champion.run_id == run.info.run_id
        loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        assert loaded.predict(pd.DataFrame({"x": [1.5]}))["x"].tolist() == [3.0]
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)

    # The artifacts are in the S3 bucket, under the compose file's artifact root...
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket="mlflow", Prefix="artifacts/")["Contents"]]
    assert any(k.endswith("MLmodel") for k in keys), keys
    # ... and the runs, metrics and registry in Postgres, owned by the mlflow role.
    db = {"user": "mlflow", "password": stack_env["MLFLOW_DB_PASSWORD"], "db": "mlflow"}
    assert psql(databases, "SELECT count(*) FROM runs WHERE run_uuid = "
                           f"'{run.info.run_id}'", **db) == "1"
    assert psql(databases, "SELECT alias || '=' || version FROM registered_model_aliases "
                           f"WHERE name = '{name}'", **db) == f"champion={version.version}"


def test_prefect_server_on_postgres_with_the_gpu_work_pool(prefect_url, databases, stack_env,
                                                           tmp_path):
    env = {**_clean_environ(tmp_path), "PREFECT_API_URL": prefect_url}
    created = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "detr-ops-gpu",
                              "--type", "kubernetes", "--base-job-template", str(TEMPLATE)],
                             env=env, capture_output=True, text=True, timeout=180)
    assert created.returncode == 0, created.stdout + created.stderr
    manifest = asyncio.run(_render_flow_run(prefect_url))

    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/detr-ops:1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env_vars = {e["name"]: e.get("value") for e in container["env"]}
    assert env_vars["PREFECT_API_URL"] == prefect_url
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://mlflow.detr-ops:5000"
    assert manifest["spec"]["template"]["spec"]["nodeSelector"] == \
        {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert manifest["metadata"]["labels"]["prefect.io/deployment-name"] == "gpu"
    _validate_job(manifest)
    # The server keeps its state in Postgres, in the prefect role's database.
    assert psql(databases, "SELECT type FROM work_pool WHERE name = 'detr-ops-gpu'",
                user="prefect", password=stack_env["PREFECT_DB_PASSWORD"], db="prefect") \
        == "kubernetes"


async def _render_flow_run(api_url: str) -> dict:
    """What the Kubernetes worker does for a flow run of a deployment on the pool, up to the
    Job it would submit: read the pool and deployment, merge the job variables, render."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_client() as client:
            pool = await client.read_work_pool("detr-ops-gpu")
            assert pool.type == "kubernetes"
            assert pool.base_job_template == json.loads(TEMPLATE.read_text())
            flow_id = await client.create_flow_from_name("retrain")
            deployment_id = await client.create_deployment(
                flow_id=flow_id, name="gpu", work_pool_name="detr-ops-gpu",
                entrypoint=deploy.ENTRYPOINT,
                job_variables={"gpu_count": 4, "image": "registry.example.com/detr-ops:1.0",
                               "node_selector": {"nvidia.com/gpu.product":
                                                 "NVIDIA-H100-80GB-HBM3"},
                               "env": {"MLFLOW_TRACKING_URI": "http://mlflow.detr-ops:5000"}})
            flow_run = await client.create_flow_run_from_deployment(deployment_id)
            config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                flow_run, client=client, work_pool=pool, worker_name="test-worker")
            return config.job_manifest


def _validate_job(manifest: dict) -> None:
    """Strict Kubernetes schema check of the rendered Job. prefect-kubernetes requires
    ``parallelism``/``completions`` inside the *pod* spec of every template (its base-manifest
    check); the API server drops those unknown fields, so they are removed before the strict
    check, and strict validation is shown to fail on them otherwise."""
    import kubernetes_validate.utils as kv

    pod = manifest["spec"]["template"]["spec"]
    assert pod.get("parallelism") == 1 and pod.get("completions") == 1
    with pytest.raises(Exception, match="parallelism|completions"):
        kv.validate(manifest, kv.latest_version(), strict=True)
    cleaned = copy.deepcopy(manifest)
    for key in ("parallelism", "completions"):
        cleaned["spec"]["template"]["spec"].pop(key)
    kv.validate(cleaned, kv.latest_version(), strict=True)


def test_compose_worker_command_registers_with_the_server(rendered, prefect_url, databases,
                                                          s3_server, tmp_path):
    command, env = _local(rendered["services"]["worker"], databases, s3_server.endpoint)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    env = {**_clean_environ(tmp_path), **env, "PREFECT_API_URL": prefect_url}
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        pool = command[command.index("--pool") + 1]
        name = command[command.index("--name") + 1]
        workers = asyncio.run(_wait_for_worker(prefect_url, pool, name, proc, log))
        assert name in workers
    finally:
        stop(proc)


async def _wait_for_worker(api_url: str, pool: str, name: str, proc, log: Path,
                           timeout_s: float = 120) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_client() as client:
            while loop.time() < deadline and proc.poll() is None:
                try:
                    found = await client.read_workers_for_work_pool(pool, limit=50, offset=0)
                    names = [w.name for w in found]
                    if name in names:
                        assert (await client.read_work_pool(pool)).type == "process"
                        return names
                except (ObjectNotFound, PrefectHTTPStatusError) as exc:  # no pool yet
                    if getattr(getattr(exc, "response", None), "status_code", 404) != 404:
                        raise
                await asyncio.sleep(1)
    pytest.fail(f"worker {name!r} did not register on pool {pool!r}:\n"
                f"{log.read_text()[-3000:]}")
