"""A real ``mlflow server`` for tests, started and killed by the test.

SQLite backend and artifact folder under a temporary directory, a free 127.0.0.1 port, its own
session (process group) so that :meth:`MlflowServer.kill` takes its workers along. The job
runner (MLflow's GenAI job queue: a dozen extra processes) is off unless the caller's
environment says otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, *, method: str = "GET", headers: dict | None = None,
            body: bytes | None = None, timeout: float = 30.0) -> tuple[int, str]:
    """(HTTP status, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


class MlflowServer:
    """``mlflow server`` on ``127.0.0.1:<port>`` with its store under ``root``.

    ``argv``: the full command (default: a one-worker server on this store); ``env``: its
    environment (default: this process's, without MLflow client settings).
    """

    def __init__(self, root: Path, *, port: int | None = None, argv: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = argv or [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--default-artifact-root", (self.root / "mlartifacts").as_uri(),
            "--no-serve-artifacts"]
        base = env if env is not None else {k: v for k, v in os.environ.items()
                                            if not k.startswith("MLFLOW_")}
        self.env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                    "MLFLOW_DISABLE_TELEMETRY": "true", **base}
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *, wait: bool = True) -> MlflowServer:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.root,
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> float:
        """Seconds until ``/health`` answered 200 (AssertionError, with the log, if never)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            assert self.proc is not None and self.proc.poll() is None, (
                f"mlflow server exited with {self.proc and self.proc.returncode}:\n{self.tail()}")
            try:
                if request(f"{self.url}/health", timeout=2)[0] == 200:
                    return time.monotonic() - began
            except OSError:  # not listening yet
                pass
            time.sleep(0.3)
        raise AssertionError(f"mlflow server: no /health within {timeout:.0f} s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group: the server goes away at once, mid-request."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
