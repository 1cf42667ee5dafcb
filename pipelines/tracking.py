"""MLflow tracking: where runs go, one run per pipeline execution, tags, retries.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a server such as ``http://127.0.0.1:5000``),
else the project's MLflow server if ``make serve`` started it and it answers now, else a SQLite
file in the project (``sqlite:///<root>/mlflow.db``: MLflow 3 refuses a plain folder store, and
the registry needs SQL). Artifacts of the SQLite store go to ``<root>/mlartifacts``; the
project's server keeps both in the same places, so it is one store either way.

One MLflow run spans train, evaluate and register: ``train`` starts it and writes its id to
``reports/mlflow_run.json`` (a DVC output); the later stages read that file and log into the
same run (:func:`resume_run`).

A server that is down or restarting: every call goes through :func:`retry` (``attempts``
tries, exponential backoff from ``backoff_s``; environment ``DETR_MLFLOW_ATTEMPTS``,
``DETR_MLFLOW_BACKOFF_S``), then fails with :class:`TrackingUnavailableError` naming the server
and the call. MLflow's own HTTP retries (7 with backoff factor 2 by default: about four minutes
per call against a dead server) are cut to 2 quick ones unless set in the environment, so that
this policy is the one in force: a dead server fails a stage after about half a minute.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pipelines.params import project_root

RUN_FILE = Path("reports/mlflow_run.json")
EXPERIMENT = "detr"
ATTEMPTS, BACKOFF_S = 5, 1.0  # defaults of retry(): waits of 1, 2, 4, 8 s between attempts
T = TypeVar("T")


class TrackingUnavailableError(RuntimeError):
    """MLflow could not be reached after every retry (the message names the server and call)."""


def tracking_uri(root: Path | None = None) -> str:
    """Where the runs of the project at ``root`` (default: :func:`project_root`) go."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    from pipelines import server_state

    root = root or project_root()
    return server_state.live_url("mlflow", root) or f"sqlite:///{root / 'mlflow.db'}"


def configure() -> str:
    """Point MLflow at :func:`tracking_uri` (registry included); returns the URI."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # retry() does the rest
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def retry(fn: Callable[[], T], *, what: str, attempts: int | None = None,
          backoff_s: float | None = None) -> T:
    """Call ``fn``, retrying with exponential backoff (``backoff_s``, twice that, ...) on
    connection-type errors (the tracking server being restarted or briefly away). Other errors
    are raised at once. ``attempts``/``backoff_s`` default to the environment's
    ``DETR_MLFLOW_ATTEMPTS``/``DETR_MLFLOW_BACKOFF_S``, else :data:`ATTEMPTS`/:data:`BACKOFF_S`.

    Raises:
        TrackingUnavailableError: still failing after the last attempt.
    """
    from mlflow.exceptions import MlflowException

    attempts = attempts or int(os.environ.get("DETR_MLFLOW_ATTEMPTS") or ATTEMPTS)
    backoff_s = backoff_s if backoff_s is not None else float(
        os.environ.get("DETR_MLFLOW_BACKOFF_S") or BACKOFF_S)
    transient = (ConnectionError, TimeoutError, OSError, MlflowException)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except transient as exc:
            if isinstance(exc, MlflowException) and not _is_transient(exc):
                raise
            if attempt == attempts:
                raise TrackingUnavailableError(
                    f"MLflow at {tracking_uri()} unreachable while trying to {what} "
                    f"({attempts} attempts, {backoff_s * (2 ** (attempts - 1) - 1):g} s of "
                    f"backoff): {_first_line(exc)}") from exc
            wait = backoff_s * 2 ** (attempt - 1)
            print(f"MLflow at {tracking_uri()} unreachable while trying to {what} (attempt "
                  f"{attempt}/{attempts}); retrying in {wait:g} s", file=sys.stderr, flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _is_transient(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("connection", "timed out", "temporarily", "503", "502",
                                   "database is locked", "max retries"))


def _experiment_artifacts() -> str | None:
    """Artifact root for a new experiment in a local SQLite store: ``<root>/mlartifacts``
    (None for a server, which has its own). Decided by the URI, not by the environment:
    ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in the process."""
    if not tracking_uri().startswith("sqlite:"):
        return None
    return (project_root() / "mlartifacts").as_uri()


def start_run(*, run_file: Path = RUN_FILE, run_name: str | None = None,
              experiment: str = EXPERIMENT) -> str:
    """Create the pipeline's MLflow run, tag it, write its id to ``run_file``; return the id."""
    import mlflow

    configure()

    def create() -> str:
        exp = mlflow.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else mlflow.create_experiment(
            experiment, artifact_location=_experiment_artifacts())
        run = mlflow.MlflowClient().create_run(exp_id, run_name=run_name, tags=run_tags())
        return run.info.run_id

    run_id = retry(create, what="create the run")
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri(),
                                    "experiment": experiment}, indent=2) + "\n")
    return run_id


def read_run_id(run_file: Path = RUN_FILE) -> str:
    try:
        return json.loads(run_file.read_text())["run_id"]
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeError(f"{run_file}: no MLflow run id (run the train stage first): "
                           f"{exc}") from exc


@contextmanager
def resume_run(run_file: Path = RUN_FILE):
    """Make the pipeline's run active (``with resume_run(): mlflow.log_metric(...)``).

    On leaving, the run is marked FINISHED; on an error, FAILED, best effort: a server that is
    away then must not replace the error that got us here with its own.
    """
    import mlflow

    configure()
    run_id = read_run_id(run_file)
    run = retry(lambda: mlflow.start_run(run_id=run_id), what=f"resume run {run_id}")
    try:
        yield run
    except BaseException:
        _end_run(run_id, "FAILED", quiet=True)
        raise
    _end_run(run_id, "FINISHED", quiet=False)


def _end_run(run_id: str, status: str, *, quiet: bool) -> None:
    import mlflow

    try:
        try:
            mlflow.end_run(status)  # leaves the run here first, then tells the server
        except Exception:
            if quiet:
                raise
            retry(lambda: mlflow.MlflowClient().set_terminated(run_id, status),
                  what=f"mark run {run_id} {status}")
    except Exception as exc:
        if not quiet:
            raise
        print(f"MLflow: could not mark run {run_id} {status}: {_first_line(exc)}",
              file=sys.stderr)


def run_tags() -> dict[str, str]:
    """git commit, DVC stage/experiment names where present, the host's user-facing bits."""
    tags = {"mlflow.source.type": "PROJECT", "pipeline": "detr-ops"}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
        if _git("status", "--porcelain"):
            tags["git_dirty"] = "true"
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        if os.environ.get(var):
            tags[var.lower()] = os.environ[var]
    return tags


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=project_root(), capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def dvc_hash(path: str) -> str | None:
    """The md5 DVC recorded for output ``path`` in dvc.lock (the dataset's version)."""
    import yaml

    lock = project_root() / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5")
    return None


def flat_params(sections: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": "0.0001"}`` for ``mlflow.log_params``;
    nested sections (``model.aids.dense``) and config dataclasses are flattened all the way
    down, so each knob is one param."""
    out = {}
    for key, value in sections.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]
    return out
