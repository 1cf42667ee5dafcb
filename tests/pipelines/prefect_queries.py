"""Reading runs back from a Prefect server in tests (the current settings' API).

Prefect 3.8.8's client sends null limit/offset/sort in some filter calls unless given, which
its own server refuses (422): every query here passes them. Logs are shipped in the background:
:func:`logs` flushes this process's handler first.
"""

from __future__ import annotations

import time
from uuid import UUID


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def flow_runs(flow_name: str, limit: int = 20) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with client() as c:
        return c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                sort=FlowRunSort.START_TIME_DESC, limit=limit, offset=0)


def task_runs(flow_run_id: UUID) -> list:
    """The flow run's task runs, in the order they were expected to start."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with client() as c:
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200, offset=0)


def artifacts(flow_run_id: UUID) -> list:
    """The run's artifacts by key. (Every filter is given: a missing one is sent as null.)"""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    with client() as c:
        return c.read_artifacts(
            artifact_filter=ArtifactFilter(),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(), sort=ArtifactSort.KEY_ASC, limit=100, offset=0)


def logs(flow_run_id: UUID, limit: int = 5000) -> list:
    """Up to ``limit`` log records of the run, oldest first (pages of 200, the server's most)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    records: list = []
    with client() as c:
        while len(records) < limit:
            page = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                               limit=200, offset=len(records), sort=LogSort.TIMESTAMP_ASC)
            records += page
            if len(page) < 200:
                break
    return records


def wait_for_logs(flow_run_id: UUID, needle: str, timeout: float = 30.0) -> list[str]:
    """The run's log messages, once one contains ``needle`` (logs arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        messages = [log.message for log in logs(flow_run_id)]
        if any(needle in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(1.0)


def wait_final(flow_run_id: UUID, timeout: float) -> object:
    """The flow run once its state is final (Completed, Failed, Crashed, Cancelled)."""
    deadline = time.monotonic() + timeout
    with client() as c:
        while True:
            run = c.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {run.state_name} after "
                                   f"{timeout:.0f} s")
            time.sleep(2.0)


def states(flow_run_id: UUID) -> list[str]:
    """The names of the states the flow run went through, oldest first."""
    with client() as c:
        return [s.name for s in c.read_flow_run_states(flow_run_id)]
