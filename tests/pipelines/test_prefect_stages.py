"""With a Prefect server configured, a stage runs as a flow: visible, with logs and artifacts."""

from __future__ import annotations

import asyncio

import pytest

from pipelines import stage
from pipelines.params import DemoConfig, PrepareConfig
from pipelines.stages.prepare import prepare_flow, run


async def _flow_runs(name: str):
    """Flow runs of flow ``name`` and their logs. (Prefect 3.8.8's client sends null limit,
    offset and sort unless given, which its own server refuses with a 422: pass them.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort, LogSort

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[name])), limit=10,
            sort=FlowRunSort.START_TIME_DESC)
        logs = {r.id: await client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id])), limit=200, offset=0,
            sort=LogSort.TIMESTAMP_ASC) for r in runs}
    return runs, logs


def test_without_a_server_the_pure_stage_runs(monkeypatch, tmp_path):
    """No Prefect API in the environment or the settings (cleared here: also in any test
    order, while this module's test server is up) and no project server: ``run`` is called."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)  # a project without `make serve` state
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert not stage.prefect_enabled()
        assert stage.invoke(lambda **kw: "flow", lambda **kw: "run") == "run"


@pytest.mark.slow
def test_a_stage_becomes_a_flow_run_with_logs(prefect_server, tmp_path):
    assert stage.prefect_enabled()
    cfg = PrepareConfig(demo=DemoConfig(num_train=3, num_val=3, image_size=64, max_objects=2))
    summary = stage.invoke(prepare_flow, run, cfg=cfg, out_dir=tmp_path / "dataset")
    assert summary["images"] == {"train": 3, "val": 3}
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs travel to the server in the background
    runs, logs = asyncio.run(_flow_runs("prepare"))
    assert runs and runs[0].state.is_completed()
    messages = [log.message for log in logs[runs[0].id]]
    assert any("prepare: demo -> " in m for m in messages), messages  # the stage's own output
    assert any("Finished in state Completed" in m for m in messages), messages
