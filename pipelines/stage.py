"""What every stage shares: Prefect only when a server is configured, and artifacts.

``invoke(flow, run, **kwargs)``: with a Prefect API configured (``PREFECT_API_URL`` in the
environment or the active Prefect profile), the stage runs as its Prefect flow: it shows in the
UI with its logs and artifacts. So does a Prefect server that ``make serve`` started for this
project and that answers now (:func:`pipelines.server_state.live_url`). Without one, the pure ``run``
is called directly, so a plain ``dvc repro`` needs no server and does not start a temporary one
(~8 s a stage). ``PIPELINES_STAGE_FLOWS=0`` also calls ``run`` directly: the ``retrain`` flow
sets it for the stages it runs, which it shows as its own tasks (a stage in a subprocess could
only open a second, unlinked flow run).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLOWS_SWITCH = "PIPELINES_STAGE_FLOWS"
DATASET = Path("data/dataset")  # prepare's output: the canonical layout the later stages read
VALIDATION_REPORT = Path("reports/validation/validation.json")  # the validate stage's
DATASET_STATS = VALIDATION_REPORT.parent / "dataset.json"  # its statistics, beside it


def prefect_api_url() -> str | None:
    """The Prefect API the stages report to: configured (environment, profile), else the
    project's own server from ``make serve`` if it is up; None without either, or when
    ``PIPELINES_STAGE_FLOWS=0``."""
    if os.environ.get(FLOWS_SWITCH, "1") == "0":
        return None
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return str(get_current_settings().api.url)
    from pipelines import server_state
    from pipelines.params import project_root

    return server_state.live_url("prefect", project_root())


def prefect_enabled() -> bool:
    return prefect_api_url() is not None


def invoke(flow: Callable[..., Any], run: Callable[..., Any], **kwargs: Any) -> Any:
    url = prefect_api_url()
    if url is None:
        return run(**kwargs)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        return flow(**kwargs)


def _in_flow_run() -> bool:
    try:
        from prefect.context import FlowRunContext
    except ImportError:
        return False
    return FlowRunContext.get() is not None


def publish_table(key: str, rows: list[dict], description: str) -> None:
    """A Prefect table artifact when running inside a flow; nothing otherwise."""
    if _in_flow_run():
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key=key, table=rows, description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """A Prefect markdown artifact when running inside a flow; nothing otherwise."""
    if _in_flow_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=key, markdown=markdown, description=description)
