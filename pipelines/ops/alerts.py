"""Alerts of the ``retrain`` flow: one notification per run that needs a look.

A run needs a look when it failed (a stage, ``dvc update`` / ``dvc push``, or it was refused
because another run held the lock), when it registered a version that stayed ``@challenger``,
or when the register stage found today's data drifted past ``register.drift``
(:mod:`pipelines.registry.drift`). :class:`RunWatch` follows one run (the step in progress, its
outcome) and sends at most one notification for it, naming every cause, what happened (the
failed step and its error; both models' numbers on the same val split and why; which
statistic passed which threshold) and where to look (the Prefect flow run, the MLflow run, the
registered version, the report).

The stages themselves never alert: they run as subprocesses of the flow (or of a plain
``dvc repro``, which alerts nobody: its output and ``reports/register.json`` say the same).

Channels (``alerts:`` in params.yaml, :class:`pipelines.params.AlertsConfig`) are Prefect
notification blocks, used unsaved (no Prefect server needed): ``webhook``
(``CustomWebhookNotificationBlock``: a JSON POST ``{"subject", "text", "source"}``), ``slack``
(``SlackWebhook``), ``teams`` (``MicrosoftTeamsWebhook``), ``apprise``
(``AppriseNotificationBlock``: any Apprise URL, ``mailto://`` for e-mail). The URL, and a
webhook's bearer token, are read from the environment variables the params name. A
notification that cannot be sent is a logged warning: it never fails the run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipelines.params import AlertsConfig

REGISTER_REPORT = Path("reports/register.json")
RUN_FILE = Path("reports/mlflow_run.json")
KINDS = (("FAILED", "failed"), ("NOT PROMOTED", "not promoted"), ("DATA DRIFT", "data drift"))
ERROR_LINES = 25  # of a failed step's message (its output's tail)
LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    """One notification: ``subject`` (one line) and ``body`` (plain text, a few lines)."""

    subject: str
    body: str
    failed: bool = False


@dataclass
class RunWatch:
    """Follows one retrain run of the project at ``root``: :meth:`track` wraps its step runner
    to remember the step in progress; :meth:`failed` or :meth:`finished` (one of them, once)
    sends the run's alert when there is a cause for one. ``sent`` says whether it went out."""

    cfg: AlertsConfig
    root: Path
    step: str | None = None
    sent: bool = False
    causes: list[str] = field(default_factory=list)

    def track(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def tracked(name: str, fn: Callable[..., Any], *args: Any) -> Any:
            self.step = name
            return step(name, fn, *args)
        return tracked

    def failed(self, error: BaseException) -> bool:
        """The run raised ``error``: alert (``alerts.on_failure``)."""
        if self.cfg.on_failure:
            where = f"at step {self.step!r}" if self.step else "before any step"
            self.causes.append(f"FAILED {where}: {_tail(str(error) or type(error).__name__)}")
        return self._send(report=None, failed=True)

    def finished(self, result: dict[str, Any]) -> bool:
        """The run ended with ``result`` (the flow's summary): alert if this run's version was
        not promoted (``alerts.on_not_promoted``) or its data drifted (``alerts.on_drift``)."""
        report = result.get("decision") if result.get("registered") else None
        try:
            if report and self.cfg.on_not_promoted and report.get("decision") == "challenger":
                self.causes.append(not_promoted(report))
            if report and self.cfg.on_drift and (report.get("drift") or {}).get("drifted"):
                self.causes.append(drifted(report))
        except (KeyError, TypeError, ValueError) as exc:  # a report of another layout
            self.causes.append(f"the register report could not be read ({exc!r}): "
                               f"see {self.root / REGISTER_REPORT}")
        return self._send(report=report, failed=False)

    def _send(self, *, report: dict | None, failed: bool) -> bool:
        if self.sent or not self.causes or self.cfg.channel == "none":
            return False
        try:
            alert = compose(self.causes, self.root, report=report, failed=failed)
        except Exception as exc:  # e.g. a report of another layout: alerting never fails a run
            warn(f"alert not composed ({type(exc).__name__}: {exc}); causes: {self.causes}")
            return False
        self.sent = send(self.cfg, alert)
        return self.sent


def not_promoted(report: dict[str, Any]) -> str:
    """The cause line of a version that stayed @challenger: why, and both numbers."""
    metric, champion = report["metric"], report.get("champion_version_before")
    measured = report.get("champion_value_before")
    versus = ("no champion before" if champion is None else
              f"champion v{champion}: {_num(measured)} on the same val split"
              + (f", {_num(report.get('champion_value_logged'))} as logged"
                 if report.get("champion_value_logged") is not None else ""))
    return (f"NOT PROMOTED: {report['model_name']} v{report['version']} stays @challenger: "
            f"{report.get('reason') or 'see the report'}. {metric} {_num(report['value'])} "
            f"(new) vs {versus}.")


def drifted(report: dict[str, Any]) -> str:
    """The cause line of drifted data: each statistic past its threshold."""
    from pipelines.registry.drift import drift_lines

    drift = report["drift"]
    gate = "on: the version stays @challenger" if drift.get("gate") else "off"
    return (f"DATA DRIFT against the data of champion v{drift.get('champion_version')} "
            f"(register.drift.gate {gate}):\n" + "\n".join(
                f"  - {line}" for line in drift_lines(drift)))


def compose(causes: list[str], root: Path, *, report: dict | None, failed: bool) -> Alert:
    """The notification: the causes, then where to look."""
    from prefect.runtime import flow_run

    name = flow_run.name if flow_run.id else None
    kinds = [label for prefix, label in KINDS if any(c.startswith(prefix) for c in causes)]
    subject = (f"detr retrain{f' {name}' if name else ''} on {socket.gethostname()}: "
               f"{', '.join(kinds)}")
    body = [f"Retrain run {name or '(not a Prefect flow run)'} of {root}:", *causes, "",
            "Where to look:", *where_to_look(root, report)]
    return Alert(subject=subject, body="\n".join(body), failed=failed)


def where_to_look(root: Path, report: dict | None) -> list[str]:
    """Links: the Prefect flow run, the MLflow run, the version, the reports."""
    from prefect.runtime import flow_run

    from pipelines import tracking

    ui = flow_run.ui_url if flow_run.id else None
    lines = [f"- Prefect flow run: {ui}" if ui else
             "- Prefect: not a flow run (python -m pipelines retrain without a Prefect server); "
             "its log is the command's output"]
    run_id = (report or {}).get("run_id") or _run_id(root / RUN_FILE)
    uri = (report or {}).get("tracking_uri") or tracking.tracking_uri(root)
    if run_id:
        link = f" ({uri.rstrip('/')}/#/runs/{run_id})" if uri.startswith("http") else ""
        lines.append(f"- MLflow run {run_id} in {uri}{link}"
                     + ("" if report else " (the last training run)"))
    if report:
        lines.append(f"- Model version: {report.get('model_uri', '-')}; report "
                     f"{root / REGISTER_REPORT}")
    return lines


def send(cfg: AlertsConfig, alert: Alert) -> bool:
    """Notify through ``cfg.channel``; False (with a logged warning) when the URL is not in
    the environment or the receiver failed. Never raises for a failed delivery."""
    url = os.environ.get(cfg.url_env, "").strip()
    if not url:
        warn(f"alerts.channel is {cfg.channel} but the environment variable {cfg.url_env} "
             f"(alerts.url_env) is empty: alert not sent: {alert.subject}")
        return False
    try:
        block = build_block(cfg, url, failed=alert.failed)
        with block.raise_on_failure():
            block.notify(alert.body, subject=alert.subject)
    except Exception as exc:  # a receiver that is down must not fail the retrain
        warn(f"alert not sent through {cfg.channel} to {_redacted(url)}: "
             f"{str(exc).replace(url, _redacted(url))}")
        return False
    print(f"retrain: alert sent through {cfg.channel} to {_redacted(url)}: {alert.subject}")
    return True


def build_block(cfg: AlertsConfig, url: str, *, failed: bool = False):
    """The Prefect notification block of ``cfg.channel`` for ``url`` (not saved anywhere).

    Raises:
        KeyError: ``alerts.token_env`` names an empty environment variable.
        ValueError: the URL does not suit the channel (the block's own check).
    """
    from prefect.blocks import notifications as blocks

    if cfg.channel == "webhook":
        secrets, headers = {}, None
        if cfg.token_env:
            token = os.environ.get(cfg.token_env, "").strip()
            if not token:
                raise KeyError(f"alerts.token_env: environment variable {cfg.token_env} is "
                               f"empty")
            secrets, headers = {"token": token}, {"Authorization": "Bearer {{token}}"}
        return blocks.CustomWebhookNotificationBlock(
            name="detr-retrain", url=url, headers=headers, secrets=secrets,
            json_data={"subject": "{{subject}}", "text": "{{body}}", "source": "{{name}}"},
            timeout=cfg.timeout_s)
    kind = {"slack": blocks.SlackWebhook, "teams": blocks.MicrosoftTeamsWebhook,
            "apprise": blocks.AppriseNotificationBlock}[cfg.channel]
    return kind(url=url, notify_type="failure" if failed else "warning")


def warn(text: str) -> None:
    """A warning in the flow run's log (or this module's logger outside a run)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        logger = get_run_logger()
    except MissingContextError:
        logger = LOGGER
    logger.warning("retrain: warning: %s", text)


def _redacted(url: str) -> str:
    """``scheme://host/...``: enough to say where, nothing of a token in the path or query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}/..."


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    cut = ["..."] if len(lines) > ERROR_LINES else []
    return "\n".join([lines[0], *cut, *lines[1:][-ERROR_LINES + 1:]]) if lines else text


def _run_id(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
