"""MLflow tracking: where runs go, one run per pipeline execution, tags, retries.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a server such as ``http://127.0.0.1:5000``),
else a SQLite file in the project (``sqlite:///<root>/mlflow.db``: MLflow 3 refuses a plain
folder store, and the registry needs SQL). Artifacts of the SQLite store go to
``<root>/mlartifacts``.

One MLflow run spans train, evaluate and register: ``train`` starts it and writes its id to
``reports/mlflow_run.json`` (a DVC output); the later stages read that file and log into the
same run (:func:`resume_run`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

RUN_FILE = Path("reports/mlflow_run.json")
EXPERIMENT = "detr"
T = TypeVar("T")


def project_root() -> Path:
    """The DVC project root (``DVC_ROOT`` inside a stage), else the working directory."""
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{project_root() / 'mlflow.db'}"


def configure() -> str:
    """Point MLflow at :func:`tracking_uri` (registry included); returns the URI."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def retry(fn: Callable[[], T], *, what: str, attempts: int = 4, backoff_s: float = 1.0) -> T:
    """Call ``fn``, retrying with exponential backoff on connection-type errors (the tracking
    server being restarted or briefly away). Other errors are raised at once."""
    from mlflow.exceptions import MlflowException

    transient = (ConnectionError, TimeoutError, OSError, MlflowException)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except transient as exc:
            if isinstance(exc, MlflowException) and not _is_transient(exc):
                raise
            if attempt == attempts:
                raise RuntimeError(f"MLflow at {tracking_uri()} unreachable while trying to "
                                   f"{what} ({attempts} attempts): {exc}") from exc
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


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
    """Make the pipeline's run active (``with resume_run(): mlflow.log_metric(...)``)."""
    import mlflow

    configure()
    run_id = read_run_id(run_file)
    run = retry(lambda: mlflow.start_run(run_id=run_id), what=f"resume run {run_id}")
    try:
        yield run
    finally:
        mlflow.end_run()


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


def flat_params(sections: dict[str, Any]) -> dict[str, str]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": "0.0001"}`` for ``mlflow.log_params``."""
    out = {}
    for section, values in sections.items():
        for key, value in values.items():
            out[f"{section}.{key}"] = str(value)[:6000]
    return out
