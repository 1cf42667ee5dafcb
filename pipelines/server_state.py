"""Is a server of this project up? What the stages ask before they log or run as flows.

``make serve`` (:mod:`pipelines.ops.servers`) records the servers' URLs in
``SERVE_DIR/state.json`` (``<project>/.servers``); :func:`live_url` reads it and checks that
the server answers now. Kept apart from the servers' start/stop code, so the stages do not
depend on the operations that run them.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

STATE_FILE = "state.json"


def serve_dir(root: Path, env: Mapping[str, str] = os.environ) -> Path:
    return (Path(root) / env.get("SERVE_DIR", ".servers")).resolve()


def read_state(root: Path) -> dict | None:
    try:
        return json.loads((serve_dir(root) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def live_url(service: str, root: Path) -> str | None:
    """The URL of ``service`` ("mlflow": the tracking URI, "prefect": the API URL) that
    ``make serve`` started for the project at ``root``, if it answers its health check now."""
    state = read_state(root)
    if not state or service not in ("mlflow", "prefect"):
        return None
    url = state.get(f"{service}_url")
    health = f"{url}/health" if service == "mlflow" else f"{url}/api/health"
    if url and healthy(health, timeout=2.0):
        return url if service == "mlflow" else f"{url}/api"
    return None


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False
