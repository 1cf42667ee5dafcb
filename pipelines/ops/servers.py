"""Servers on one machine: ``make serve`` / ``make stop`` (``infra/serve.sh``, ``infra/stop.sh``).

    python -m pipelines.ops.servers start | stop | status

``start`` brings up, each bound to ``SERVE_HOST`` (default 127.0.0.1) and each only if it is
not already running:

- the Prefect server (API and UI) on ``PREFECT_PORT`` (4200); its SQLite database lives in
  ``PREFECT_DATA`` (``<project>/.prefect``, used as ``PREFECT_HOME``);
- the MLflow tracking server and UI on ``MLFLOW_PORT`` (5000): backend ``sqlite:///<MLFLOW_DB>``
  (``<project>/mlflow.db``), artifacts in ``MLFLOW_ARTIFACTS`` (``<project>/mlartifacts``),
  written by the clients directly (``--no-serve-artifacts``). That is the very store the stages
  use when no server is up, so runs made with and without the server are one history. MLflow's
  host-header and CORS protection stay on; one worker process is the single SQLite writer;
- a Prefect process worker for the work pool ``schedule.work_pool`` (params.yaml), which runs
  the ``retrain`` deployment (``make deploy``) with this environment's Python and
  ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` pointing at the two servers.

Each runs in its own session (process group). Pid files, logs and ``state.json`` (the URLs) are
kept in ``SERVE_DIR`` (``<project>/.servers``, git-ignored). ``stop`` sends SIGTERM to each
group (worker first), SIGKILL after ``STOP_GRACE_S``, and removes the state. Both commands are
idempotent. The pipeline finds the servers through
:func:`pipelines.server_state.live_url` (``state.json`` plus a health check): with them up, the stages log to this MLflow server and run as Prefect flows;
without them, they use the embedded defaults (``mlflow.db``, no Prefect).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines.server_state import STATE_FILE, healthy, read_state, serve_dir

BIN = Path(sys.executable).parent
STOP_GRACE_S = 20.0
SERVICES = ("prefect", "mlflow", "worker")  # start order; stop goes backwards


class ServeError(RuntimeError):
    """A server could not be started or stopped; the message says which and where its log is."""


@dataclass(frozen=True)
class ServeConfig:
    """Where the servers listen and keep their data; see the module doc for the variables."""

    root: Path
    host: str
    prefect_port: int
    mlflow_port: int
    prefect_home: Path
    mlflow_db: Path
    mlflow_artifacts: Path
    run_dir: Path
    timeout_s: float

    @classmethod
    def from_env(cls, root: Path, env: Mapping[str, str] = os.environ) -> ServeConfig:
        root = Path(root).resolve()

        def path(var: str, default: str) -> Path:
            return (root / env.get(var, default)).resolve()

        def number(var: str, default: str, kind: type) -> int | float:
            try:
                return kind(env.get(var, default))
            except ValueError:
                raise ServeError(f"{var}={env[var]!r}: expected a {kind.__name__}") from None

        return cls(root=root, host=env.get("SERVE_HOST", "127.0.0.1"),
                   prefect_port=number("PREFECT_PORT", "4200", int),
                   mlflow_port=number("MLFLOW_PORT", "5000", int),
                   prefect_home=path("PREFECT_DATA", ".prefect"),
                   mlflow_db=path("MLFLOW_DB", "mlflow.db"),
                   mlflow_artifacts=path("MLFLOW_ARTIFACTS", "mlartifacts"),
                   run_dir=serve_dir(root, env),
                   timeout_s=number("SERVE_TIMEOUT_S", "180", float))

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"


# ---- start -------------------------------------------------------------------------------

def commands(cfg: ServeConfig, work_pool: str, worker_name: str) -> dict[str, list[str]]:
    return {
        "prefect": [str(BIN / "prefect"), "server", "start", "--host", cfg.host,
                    "--port", str(cfg.prefect_port)],
        "mlflow": [str(BIN / "mlflow"), "server", "--host", cfg.host,
                   "--port", str(cfg.mlflow_port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{cfg.mlflow_db}",
                   "--default-artifact-root", cfg.mlflow_artifacts.as_uri(),
                   "--no-serve-artifacts"],
        "worker": [str(BIN / "prefect"), "worker", "start", "--pool", work_pool,
                   "--type", "process", "--name", worker_name],
    }


# Settings in a user's shell that would switch the MLflow server's host-header / CORS checks
# off: `make serve` never passes them on (tests/pipelines/test_security.py).
_UNSAFE_SERVER_SETTINGS = ("MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS",
                           "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE",
                           "MLFLOW_SERVER_X_FRAME_OPTIONS")


def environment(cfg: ServeConfig, service: str) -> dict[str, str]:
    """The servers get no client URLs (they are the servers); the worker gets both, and this
    environment's bin/ first on PATH (the stages run ``python -m pipelines ...`` and ``dvc``)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", *_UNSAFE_SERVER_SETTINGS)}
    env.update(PREFECT_HOME=str(cfg.prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    if service == "prefect":  # the UI's pages call the API at this URL (else :4200)
        env.update(PREFECT_SERVER_API_HOST=cfg.host, PREFECT_SERVER_API_PORT=str(cfg.prefect_port),
                   PREFECT_UI_API_URL=f"{cfg.prefect_url}/api")
    if service == "worker":
        env.update(PREFECT_API_URL=f"{cfg.prefect_url}/api", MLFLOW_TRACKING_URI=cfg.mlflow_url,
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def start(cfg: ServeConfig, work_pool: str) -> dict:
    """Start what is not running, wait until each answers, write and return the state."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    cfg.prefect_home.mkdir(parents=True, exist_ok=True)
    cfg.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    state = read_state(cfg.root) or {}
    worker_name = f"{work_pool}-{uuid.uuid4().hex[:8]}"
    if _pid(cfg, "worker") and state.get("worker_name"):
        worker_name = state["worker_name"]  # the running one keeps its name
    argv = commands(cfg, work_pool, worker_name)
    checks = {"prefect": lambda: healthy(f"{cfg.prefect_url}/api/health"),
              "mlflow": lambda: healthy(f"{cfg.mlflow_url}/health"),
              "worker": lambda: _worker_online(cfg, work_pool, worker_name)}
    ports = {"prefect": cfg.prefect_port, "mlflow": cfg.mlflow_port}
    started = []
    for service in ("prefect", "mlflow"):  # the two servers start side by side
        if _launch(cfg, service, argv[service], ports[service]):
            started.append(service)
    for service in ("prefect", "mlflow"):
        _wait(cfg, service, checks[service])
    if _launch(cfg, "worker", argv["worker"], None):
        started.append("worker")
    _wait(cfg, "worker", checks["worker"])
    state = {"prefect_url": cfg.prefect_url, "prefect_api_url": f"{cfg.prefect_url}/api",
             "mlflow_url": cfg.mlflow_url, "work_pool": work_pool, "worker_name": worker_name,
             "prefect_home": str(cfg.prefect_home),
             "mlflow_backend": f"sqlite:///{cfg.mlflow_db}",
             "mlflow_artifacts": str(cfg.mlflow_artifacts),
             "pids": {s: _pid(cfg, s) for s in SERVICES}, "started": started}
    (cfg.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return state


def _launch(cfg: ServeConfig, service: str, argv: list[str], port: int | None) -> bool:
    """Start ``service`` unless its pid file names a live process of ours; False if running."""
    if _pid(cfg, service):
        return False
    if port is not None and _port_taken(cfg.host, port):
        var = "PREFECT_PORT" if service == "prefect" else "MLFLOW_PORT"
        raise ServeError(f"{service}: {cfg.host}:{port} is taken by a program that `make serve` "
                         f"did not start; stop it or choose another port ({var}=...)")
    log = cfg.run_dir / f"{service}.log"
    with log.open("ab") as out:
        out.write(f"\n==== {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, cwd=cfg.root, env=environment(cfg, service),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (cfg.run_dir / f"{service}.pid").write_text(f"{proc.pid}\n")
    return True


def _wait(cfg: ServeConfig, service: str, check) -> None:
    deadline = time.monotonic() + cfg.timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if not _pid(cfg, service):
            raise ServeError(f"{service} exited while starting; its log "
                             f"({cfg.run_dir / service}.log) ends with:\n{_tail(cfg, service)}")
        time.sleep(0.5)
    raise ServeError(f"{service} did not answer within {cfg.timeout_s:.0f} s (SERVE_TIMEOUT_S); "
                     f"its log ({cfg.run_dir / service}.log) ends with:\n{_tail(cfg, service)}")


def _worker_online(cfg: ServeConfig, pool: str, name: str) -> bool:
    """The worker has registered with the server (it then polls the pool for runs)."""
    body = json.dumps({"workers": {"status": {"any_": ["ONLINE"]}}, "limit": 200, "offset": 0})
    request = urllib.request.Request(f"{cfg.prefect_url}/api/work_pools/{pool}/workers/filter",
                                     data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            workers = json.loads(response.read())
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return any(w.get("name") == name and w.get("status") == "ONLINE" for w in workers)


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _tail(cfg: ServeConfig, service: str, lines: int = 25) -> str:
    try:
        text = (cfg.run_dir / f"{service}.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ---- stop --------------------------------------------------------------------------------

def _pid(cfg: ServeConfig, service: str) -> int | None:
    """The pid in ``<service>.pid`` if that process is alive and is still ours; a stale pid
    file (process gone, or the pid reused by another program) is removed."""
    import psutil

    pid_file = cfg.run_dir / f"{service}.pid"
    try:
        pid = int(pid_file.read_text().strip())
        proc = psutil.Process(pid)
        ours = proc.status() != psutil.STATUS_ZOMBIE and any(
            ("prefect" if service != "mlflow" else "mlflow") in part
            for part in proc.cmdline())
    except (OSError, ValueError, psutil.Error):
        ours = False
    if not ours:
        pid_file.unlink(missing_ok=True)
        return None
    return pid


def stop(cfg: ServeConfig, services: tuple[str, ...] = SERVICES) -> list[str]:
    """Stop the running ``services`` of this project (worker first); returns those stopped.

    Each service goes with every process it started, including those in sessions of their own
    (the worker's flow runs and their stages): SIGTERM, then SIGKILL after ``STOP_GRACE_S``.
    The state file goes once nothing is left running."""
    import psutil

    stopped = []
    for service in reversed(SERVICES):
        pid = _pid(cfg, service) if service in services else None
        if pid is None:
            continue
        try:
            tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        _signal_group(pid, signal.SIGTERM)
        for proc in tree[1:]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(tree, timeout=STOP_GRACE_S)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        (cfg.run_dir / f"{service}.pid").unlink(missing_ok=True)
        stopped.append(service)
    if not any(_pid(cfg, s) for s in SERVICES):
        (cfg.run_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # each service leads its own session: its children go too
    except ProcessLookupError:
        pass


# ---- command line --------------------------------------------------------------------------

def _where(state: dict, cfg: ServeConfig) -> str:
    return "\n".join([
        f"  Prefect UI  {state['prefect_url']}        (API {state['prefect_api_url']})",
        f"  MLflow UI   {state['mlflow_url']}        (store {state['mlflow_backend']}, "
        f"artifacts {state['mlflow_artifacts']})",
        f"  worker      pool {state['work_pool']!r}: runs the retrain deployment "
        "(create it with `make deploy`)",
        f"  logs        {cfg.run_dir}/*.log; stop with `make stop`"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ("start", "stop", "status"):
        print("usage: python -m pipelines.ops.servers {start,stop,status}", file=sys.stderr)
        return 2
    from pipelines.params import project_root

    root = project_root()
    try:
        cfg = ServeConfig.from_env(root)
        if argv[0] == "start":
            return _start_main(cfg)
        if argv[0] == "stop":
            stopped = stop(cfg)
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
            return 0
        running = [s for s in SERVICES if _pid(cfg, s)]
        state = read_state(root)
        print(f"running: {', '.join(running) or 'nothing'}")
        if state and running:
            print(_where(state, cfg))
        return 0 if running else 3
    except ServeError as exc:
        print(f"servers: {exc}", file=sys.stderr)
        return 1


def _start_main(cfg: ServeConfig) -> int:
    from detr.config import ConfigError
    from pipelines.params import load

    try:
        pool = load(cfg.root / "params.yaml")["schedule"].work_pool
    except ConfigError as exc:
        print(f"servers: bad params: {exc}", file=sys.stderr)
        return 2
    began = time.monotonic()
    running = [s for s in SERVICES if _pid(cfg, s)]
    try:
        state = start(cfg, pool)
    except ServeError:
        stop_new = [s for s in SERVICES if s not in running and _pid(cfg, s)]
        if stop_new:  # leave nothing half-started behind
            print(f"servers: start failed; stopping {', '.join(stop_new)}", file=sys.stderr)
            stop(cfg, tuple(stop_new))
        raise
    if state["started"]:
        print(f"started {', '.join(state['started'])} in {time.monotonic() - began:.1f} s"
              + (f" (already running: {', '.join(running)})" if running else ""))
    else:
        print("already running: " + ", ".join(SERVICES))
    print(_where(state, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
