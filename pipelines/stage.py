"""What every stage shares: Prefect only when a server is configured, and artifacts.

``invoke(flow, run, **kwargs)``: with a Prefect API configured (``PREFECT_API_URL`` in the
environment or the active Prefect profile), the stage runs as its Prefect flow: it shows in the
UI with its logs and artifacts. Without one, the pure ``run`` is called directly, so a plain
``dvc repro`` needs no server and does not start a temporary one (~8 s a stage).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def prefect_enabled() -> bool:
    if os.environ.get("PREFECT_API_URL"):
        return True
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def invoke(flow: Callable[..., Any], run: Callable[..., Any], **kwargs: Any) -> Any:
    return flow(**kwargs) if prefect_enabled() else run(**kwargs)


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
