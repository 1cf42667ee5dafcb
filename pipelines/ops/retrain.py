"""The ``retrain`` flow: new data in, stale stages re-run through DVC, the model registered.

    python -m pipelines retrain [--project DIR] [--lock-wait S] [--no-push]

Steps, each a Prefect task run with its own state and logs when this runs as a flow (the
scheduled deployment, ``make deploy``; or the command with a Prefect server up):

1. ``update-data``: ``dvc update`` of the project's imported datasets (``.dvc`` files written by
   ``dvc import`` / ``dvc import-url``), so their new versions come in. A path source
   (``prepare.source: data/raw``) needs no step: it is a dependency of ``prepare``, which DVC
   re-runs when it changed (a warning says so when it is not listed under ``deps:``).
2. one task per stage of ``dvc.yaml`` in pipeline order: ``dvc repro --single-item <stage>``.
   DVC skips a stage whose dependencies, params and outputs are unchanged and writes
   ``dvc.lock``: the lock file stays the truth, exactly as after a plain ``dvc repro``. The
   stage's output (DVC's and the stage's own) is streamed into the task's log.
3. ``push``: ``dvc push`` (data, checkpoints) when a default DVC remote is configured and
   ``schedule.push`` is on; otherwise a log line says why not.
4. ``decision``: the registration decision (``reports/register.json`` when ``register`` ran
   in this run; else "no new model"). Artifacts ``coco-ap-ar`` (the AP/AR table of the current
   model), ``registration`` (the decision, with the data drift table) and, when the data was
   compared with the champion's, ``data-drift`` go on this run.
5. alerts (``alerts:`` in params.yaml, :mod:`pipelines.ops.alerts`): one notification for a
   run that failed (or was refused), whose new version stayed ``@challenger``, or whose data
   drifted past ``register.drift``; sent by this flow, once, never by the stages.

A failed stage fails the run; a dataset that fails validation fails it with a message naming
the failed expectations (from ``reports/validation/validation.json``). The stages run with
``PIPELINES_STAGE_FLOWS=0``: a stage in a subprocess could only open a second, unlinked flow run.

One at a time: the whole run holds an exclusive lock (:mod:`pipelines.ops.lock`, released by the OS
if the process dies). A second run waits up to ``schedule.lock_wait_s`` and is then
refused (:class:`RetrainBusy`), so two runs never train, write ``dvc.lock``, the DVC cache or
the registry at once. The deployment adds a Prefect concurrency limit of 1 (queued runs wait
in Prefect). Exit codes: 0 done, 1 a stage or validation failed, 2 bad params, 3 refused.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines import stage
from pipelines.ops.alerts import RunWatch
from pipelines.ops.lock import RetrainBusy, retrain_lock
from pipelines.params import PARAMS_FILE, AlertsConfig, ScheduleConfig, load

BIN = Path(sys.executable).parent
VALIDATION_REPORT = stage.VALIDATION_REPORT
REGISTER_REPORT = Path("reports/register.json")
COCO_METRICS = Path("metrics/coco.json")
COCO_TABLE = Path("reports/evaluation/coco_table.txt")

Step = Callable[..., Any]  # step(name, fn, *args) -> fn(*args), as a task or directly


class StageFailed(RuntimeError):
    """A DVC stage (or ``dvc update`` / ``dvc push``) failed; the message says which and why."""


@dataclass(frozen=True)
class Plan:
    """What a run will do: ``stages`` in pipeline order, imported datasets (``.dvc`` files),
    the default DVC remote (None without one), warnings for the log."""

    stages: tuple[str, ...]
    imports: tuple[str, ...]
    remote: str | None
    warnings: tuple[str, ...] = ()


def run(project_dir: str | Path = ".", *, schedule: ScheduleConfig | None = None,
        lock_wait_s: float | None = None, push: bool | None = None,
        step: Step | None = None, alerts: AlertsConfig | None = None) -> dict[str, Any]:
    """Bring in new data, re-run stale stages, push, decide, alert; return the summary.

    ``schedule`` and ``alerts`` default to the project's ``params.yaml``'s; ``lock_wait_s`` and
    ``push`` override the schedule's.
    ``step(name, fn, *args)`` runs each step (the flow passes one that makes it a task).
    One notification (:mod:`pipelines.ops.alerts`) when the run fails, its new version stays
    @challenger or its data drifted; a notification that cannot be sent is a warning.

    Summary: ``stages`` (name -> "ran" | "skipped"), ``pushed`` (bool), ``registered`` (bool),
    ``decision`` (the register report of this run, or of the current model when nothing was
    registered; None before any registration), ``alerted`` (a notification went out).

    Raises:
        RetrainBusy: another run kept the lock for longer than ``lock_wait_s``.
        StageFailed: a stage failed (validation: the message names the failed expectations).
    """
    root = Path(project_dir).resolve()
    params = load(root / PARAMS_FILE)
    schedule = schedule or params["schedule"]
    wait = schedule.lock_wait_s if lock_wait_s is None else lock_wait_s
    watch = RunWatch(alerts or params["alerts"], root)
    step = watch.track(step or _direct)
    try:
        with retrain_lock(root, wait):
            result = _steps(root, step, schedule.push if push is None else push)
    except Exception as exc:
        watch.failed(exc)
        raise
    watch.finished(result)
    return {**result, "alerted": watch.sent}


def _steps(root: Path, step: Step, push: bool) -> dict[str, Any]:
    plan = make_plan(root)
    for warning in plan.warnings:
        print(f"retrain: warning: {warning}")
    step("update-data", update_data, root, plan)
    stages = {name: step(name, run_stage, root, name) for name in plan.stages}
    pushed = step("push", push_data, root, plan, push)
    summary = step("decision", report_decision, root, stages.get("register") == "ran")
    return {"stages": stages, "pushed": pushed, **summary}


def _direct(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    print(f"retrain: -- {name}")
    return fn(*args)


def _as_task(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    return task(fn, name=name, task_run_name=name, cache_policy=NO_CACHE)(*args)


# ---- the steps ---------------------------------------------------------------------------

def make_plan(root: Path) -> Plan:
    """Read the DVC project: pipeline stages in dependency order (ties in dvc.yaml order),
    imported datasets, the default remote, and whether a path source is a dependency."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        pipeline = [s for s in graph.nodes if isinstance(s, PipelineStage)]
        order = {s: i for i, s in enumerate(pipeline)}
        sub = graph.subgraph(pipeline).reverse()
        stages = tuple(_address(root, s) for s in nx.lexicographical_topological_sort(
            sub, key=lambda s: f"{order[s]:06d}"))
        imports = tuple(os.path.relpath(s.path, root) for s in graph.nodes if s.is_import)
        remote = repo.config["core"].get("remote")
        prepare_deps = [str(d) for s in pipeline if s.addressing == "prepare" for d in s.deps]
    return Plan(stages=stages, imports=imports, remote=remote,
                warnings=tuple(_source_warnings(root, prepare_deps)))


def _address(root: Path, stage: Any) -> str:
    """``name`` for a stage of the root dvc.yaml, ``sub/dvc.yaml:name`` for a nested one."""
    dvcfile = os.path.relpath(stage.path, root)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def _source_warnings(root: Path, prepare_deps: list[str]) -> list[str]:
    source = load(root / PARAMS_FILE)["prepare"].source
    if source == "demo" or not prepare_deps:
        return []
    src = Path(source)
    if any(src == Path(d) or Path(d) in src.parents for d in prepare_deps):
        return []
    return [f"prepare.source {source!r} is not a dependency of the prepare stage: new data "
            f"there will not be picked up; add `- {source}` under its deps: in dvc.yaml"]


def update_data(root: Path, plan: Plan) -> list[str]:
    """``dvc update`` every imported dataset; returns the ``.dvc`` files updated."""
    if not plan.imports:
        print("retrain: no imported datasets (dvc import) to update; a path source is "
              "re-prepared by the prepare stage when it changed")
        return []
    _dvc(root, ["update", *plan.imports], what="dvc update")
    return list(plan.imports)


def run_stage(root: Path, name: str) -> str:
    """``dvc repro --single-item <name>``: "ran", or "skipped" when DVC found it up to date."""
    code, lines = _stream([str(BIN / "dvc"), "repro", "--single-item", name], root)
    if code != 0:
        if name == "validate":
            failure = validation_failure(root / VALIDATION_REPORT)
            if failure:
                raise StageFailed(failure)
        tail = "\n".join(lines[-30:])
        raise StageFailed(f"stage {name!r} failed (dvc repro exit {code}); its output ends "
                          f"with:\n{tail}")
    return "ran" if any(f"Running stage '{name}'" in line for line in lines) else "skipped"


def validation_failure(report_path: Path) -> str | None:
    """The failed expectations of a validation report, as the message of a failed run."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return None
    if report.get("success", True):
        return None
    failed = [e for e in report.get("expectations", []) if not e.get("success")]
    names = ", ".join(f"{e['table']}.{e['name']}" for e in failed)
    lines = [f"the dataset failed validation: {len(failed)} of "
             f"{len(report.get('expectations', []))} expectations failed: {names}"]
    for e in failed:
        count = (f"{e['unexpected_count']}/{e['element_count']} records"
                 if e.get("unexpected_count") is not None else f"observed {e.get('observed')!r}")
        lines.append(f"FAILED {e['table']}.{e['name']} ({e['expectation']}): {count}")
        lines += [f"    {_record(x)}" for x in e.get("examples", [])[:3]]
    lines.append(f"(report: {report_path}; Data Docs: {report.get('data_docs')})")
    return "\n".join(lines)


def _record(example: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in example.items())


def push_data(root: Path, plan: Plan, enabled: bool) -> bool:
    """``dvc push`` to the default remote; False (with the reason logged) when skipped."""
    if not enabled:
        print("retrain: push disabled (schedule.push: false); nothing pushed")
        return False
    if not plan.remote:
        print("retrain: no default DVC remote configured (dvc remote add -d NAME URL); "
              "data and checkpoints stay in the local cache")
        return False
    _dvc(root, ["push"], what=f"dvc push to remote {plan.remote!r}")
    return True


def report_decision(root: Path, registered: bool) -> dict[str, Any]:
    """The registration decision of this run, as the register stage made and wrote it
    (``reports/register.json``; the rule is :func:`pipelines.registry.decision.decide`),
    published as artifacts with the AP/AR table."""
    report = _read_json(root / REGISTER_REPORT)
    if registered and report:
        text = (f"registered {report['model_uri']} as @{report['decision']} "
                f"({report['metric']} {report['value']:.4f})")
    elif report:
        text = (f"no new model: the pipeline was up to date; the last registration is still "
                f"{report['model_uri']} (@{report['decision']})")
    else:
        text = "no model registered yet"
    print(f"retrain: {text}")
    _publish(root, report, registered, text)
    return {"registered": registered and report is not None, "decision": report,
            "message": text}


def _publish(root: Path, report: dict | None, registered: bool, text: str) -> None:
    from pipelines.registry.drift import publish as publish_drift
    from pipelines.registry.report import report_markdown

    coco = _read_json(root / COCO_METRICS)
    if coco:
        table = (root / COCO_TABLE).read_text().splitlines() if (root / COCO_TABLE).is_file() \
            else []
        rows = [{"metric": k, "value": v, "line": table[i].strip() if i < len(table) else ""}
                for i, (k, v) in enumerate(coco.items())]
        stage.publish_table(key="coco-ap-ar", rows=rows,
                            description="COCO AP/AR of the current model on the val split"
                                        + ("" if registered else " (unchanged in this run)"))
    if registered:
        publish_drift((report or {}).get("drift"))
    body = report_markdown(report) if report else "# No model registered yet"
    stage.publish_markdown(key="registration", markdown=f"**{text}**\n\n{body}",
                           description=text)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- subprocesses ------------------------------------------------------------------------

def _dvc(root: Path, args: list[str], *, what: str) -> list[str]:
    code, lines = _stream([str(BIN / "dvc"), *args], root)
    if code != 0:
        tail = "\n".join(lines[-30:])
        raise StageFailed(f"{what} failed (exit {code}); its output ends with:\n{tail}")
    return lines


def stage_environment() -> dict[str, str]:
    """This environment's bin/ first on PATH (``python -m pipelines ...`` in dvc.yaml), stages
    as plain functions (``PIPELINES_STAGE_FLOWS=0``), logs instead of progress bars."""
    return {**os.environ, stage.FLOWS_SWITCH: "0", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _stream(argv: list[str], root: Path) -> tuple[int, list[str]]:
    """Run ``argv`` in ``root``, printing each output line as it comes (into the run's log
    under Prefect); returns the exit code and the last 200 lines. If this process is
    interrupted (a cancelled run, Ctrl-C), the command's whole process group is stopped."""
    print(f"$ {shlex.join([Path(argv[0]).name, *argv[1:]])}")
    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(argv, cwd=root, env=stage_environment(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)
    try:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            print(line)
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


# ---- Prefect and the command line --------------------------------------------------------

@flow(name="retrain", log_prints=True)
def retrain_flow(project_dir: str = ".", lock_wait_s: float | None = None,
                 push: bool | None = None) -> dict[str, Any]:
    """Retrain when data, code or params changed; every DVC stage is a task (module doc).
    ``lock_wait_s`` and ``push`` default to params.yaml's ``schedule:`` section."""
    return run(project_dir, lock_wait_s=lock_wait_s, push=push, step=_as_task)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines retrain``: exit codes in the module doc. A flow run (visible in
    the Prefect UI) when a Prefect server is configured or ``make serve`` runs; else plain."""
    from detr.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m pipelines retrain",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--project", default=".", help="the DVC project (default: here)")
    parser.add_argument("--lock-wait", type=float, default=None,
                        help="seconds to wait for a running retrain (default: schedule.lock_wait_s)")
    parser.add_argument("--no-push", dest="push", action="store_false", default=None,
                        help="do not `dvc push` (default: schedule.push)")
    args = parser.parse_args(argv)
    project = str(Path(args.project).resolve())
    try:
        load(Path(project) / PARAMS_FILE)
        result = stage.invoke(retrain_flow, run, project_dir=project,
                              lock_wait_s=args.lock_wait, push=args.push)
    except ConfigError as exc:
        print(f"retrain: bad params: {exc}", file=sys.stderr)
        return 2
    except RetrainBusy as exc:
        print(f"retrain: {exc}", file=sys.stderr)
        return 3
    except StageFailed as exc:
        print(f"retrain: {exc}", file=sys.stderr)
        return 1
    print(f"retrain: done: {result['message']}")
    return 0
