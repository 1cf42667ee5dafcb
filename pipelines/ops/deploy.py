"""``make deploy`` (``python -m pipelines deploy``): the scheduled ``retrain`` deployment.

Creates or updates ``retrain/<schedule.deployment>`` on the Prefect server (the project's own
from ``make serve``, or the one ``PREFECT_API_URL`` names). It runs :func:`retrain.retrain_flow`
from this project folder on the process work pool ``schedule.work_pool`` (created here if
missing; ``make serve`` starts its worker), with

- the cron schedule ``schedule.cron`` in ``schedule.timezone``, named (slug) ``params.yaml:
  <cron> (<timezone>)`` in the UI;
- a concurrency limit of 1 with the ENQUEUE strategy: a run triggered while another is running
  waits in Prefect (state AwaitingConcurrencySlot) and starts when that one has finished. The
  flow's own lock covers runs started outside the deployment.

Running it again applies params.yaml again without clobbering what was changed in the UI: a
paused deployment stays paused, schedules added in the UI stay, and the ``params`` schedule keeps
its on/off switch (``params.yaml`` schedule: the one whose name starts so); only its cron and
timezone follow params.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipelines import stage
from pipelines.params import PARAMS_FILE, ScheduleConfig, load

FLOW_NAME = "retrain"
ENTRYPOINT = "pipelines/ops/retrain.py:retrain_flow"
SCHEDULE_SLUG = "params.yaml"  # the schedule's name in the UI starts with it


class DeployError(RuntimeError):
    """No Prefect server to deploy to, or the server refused the deployment."""


def deploy(root: Path, cfg: ScheduleConfig) -> dict[str, Any]:
    """Create or update the deployment (module doc); returns its id, name, schedules, paused.

    Needs a Prefect API in the current settings (see :func:`main`)."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule

    from pipelines.ops.retrain import retrain_flow

    ensure_work_pool(cfg.work_pool)
    existing = read_deployment(f"{FLOW_NAME}/{cfg.deployment}")
    old = list(existing.schedules) if existing else []
    ours = [s for s in old if (s.slug or "").startswith(SCHEDULE_SLUG)]
    active = ours[0].active if ours else True
    slug = f"{SCHEDULE_SLUG}: {cfg.cron} ({cfg.timezone})"
    renamed = ours[0].slug if ours and ours[0].slug != slug else None
    # The server updates schedules by slug (`replaces` renames ours) and keeps the others; when
    # some have no slug it replaces them all by this list instead: the others are listed too.
    schedules = [DeploymentScheduleCreate(
        schedule=CronSchedule(cron=cfg.cron, timezone=cfg.timezone), active=active, slug=slug,
        replaces=renamed)]
    schedules += [DeploymentScheduleCreate(schedule=s.schedule, active=s.active, slug=s.slug,
                                           parameters=s.parameters)
                  for s in old if s not in ours]  # made in the UI: kept
    paused = bool(existing.paused) if existing else False
    # flow.deploy() would do the same, but in Prefect 3.8.8 it first lists the pool's workers
    # with null limit/offset, which the server refuses (422): apply the deployment directly.
    flow = retrain_flow.from_source(source=str(root), entrypoint=ENTRYPOINT)
    deployment = flow.to_deployment(
        name=cfg.deployment, work_pool_name=cfg.work_pool, schedules=schedules, paused=paused,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        description=f"Retrain the DETR pipeline of {root} (dvc repro of stale stages, "
                    "register); schedule from params.yaml `schedule:`",
        tags=["detr-ops"])
    deployment_id = deployment.apply(work_pool_name=cfg.work_pool)
    return {"id": str(deployment_id), "name": f"{FLOW_NAME}/{cfg.deployment}",
            "paused": paused, "cron": cfg.cron, "timezone": cfg.timezone, "active": active,
            "kept_schedules": len(schedules) - 1, "created": existing is None}


def ensure_work_pool(name: str) -> None:
    """Create the process work pool ``name`` unless it exists (its default job template)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template()))
            except ObjectAlreadyExists:  # the worker created it meanwhile
                pass
            return
    if pool.type != "process":
        raise DeployError(f"work pool {name!r} is of type {pool.type!r}, not 'process': "
                          "choose another schedule.work_pool")


def read_deployment(name: str):
    """The deployment ``flow/name``, or None."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines deploy``: exit 0 deployed, 1 no server / refused, 2 bad params."""
    from detr.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m pipelines deploy",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--project", default=".", help="the DVC project (default: here)")
    args = parser.parse_args(argv)
    root = Path(args.project).resolve()
    try:
        cfg = load(root / PARAMS_FILE)["schedule"]
    except ConfigError as exc:
        print(f"deploy: bad params: {exc}", file=sys.stderr)
        return 2
    url = stage.prefect_api_url()
    if url is None:
        print("deploy: no Prefect server: start the project's servers with `make serve` (or "
              "set PREFECT_API_URL)", file=sys.stderr)
        return 1
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            info = deploy(root, cfg)
    except (DeployError, ValueError, RuntimeError) as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    print(_report(info, url))
    return 0


def _report(info: dict[str, Any], api_url: str) -> str:
    ui = api_url.removesuffix("/api")
    state = "PAUSED (resume it in the UI)" if info["paused"] else "active"
    switch = "" if info["active"] else " (this schedule is switched off in the UI)"
    return "\n".join([
        f"deploy: {'created' if info['created'] else 'updated'} {info['name']}: cron "
        f"{info['cron']!r} ({info['timezone']}){switch}, {state}, one run at a time"
        + (f"; kept {info['kept_schedules']} schedule(s) made in the UI"
           if info["kept_schedules"] else ""),
        f"  UI:       {ui}/deployments/deployment/{info['id']} (run, pause, edit the schedule)",
        f"  run now:  .venv/bin/prefect deployment run {info['name']}   (with "
        f"PREFECT_API_URL={api_url})",
        "  runs on:  the worker `make serve` started (see `make serve` for its pool)"])
