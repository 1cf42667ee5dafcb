"""The retrain flow's alerts, received by a real HTTP server on 127.0.0.1.

Each run is the retrain flow on the toy DVC project (tests/pipelines/toy_project.py: real DVC,
stand-in stages, seconds); the toy register stage reports what ``toy_outcome.json`` says it
found. The notification goes through the real Prefect blocks (unsaved: no Prefect server),
with the URL and the token read from the environment.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import prefect_queries as pq
import pytest
import yaml

from detr.config import ConfigError
from pipelines.ops import alerts, retrain
from pipelines.params import AlertsConfig, load
from tests.pipelines.toy_project import make_toy

TOKEN = "s3cret-token"
WEBHOOK = {"alerts": {"channel": "webhook", "url_env": "TEST_ALERT_URL",
                      "token_env": "TEST_ALERT_TOKEN", "timeout_s": 5}}
CHALLENGER = {"decision": "challenger", "champion_version_before": 1,
              "champion_value_before": 0.3, "champion_value_logged": 0.32,
              "reason": "AP 0.2500 does not beat the champion's 0.3000 (same val split) by "
                        "more than register.min_improvement 0.0"}
DRIFT = {"drift": {"champion_version": 1, "gate": False, "drifted": ["class_balance"],
                   "note": None, "profile": "p.json", "rows": [
                       {"statistic": "class_balance", "measure": "Jensen-Shannon distance",
                        "champion": "a 100%", "new": "a 25%, b 75%", "distance": 0.6541,
                        "threshold": 0.2, "drifted": True},
                       {"statistic": "colour", "measure": "mean shift / std (max of R, G, B)",
                        "champion": "mean 1/2/3", "new": "mean 1/2/3", "distance": 0.0,
                        "threshold": 0.5, "drifted": False}]}}


class Receiver(ThreadingHTTPServer):
    """Records every request (``path``, ``headers``, ``json``); answers ``status``."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.status = 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook?key=abc"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers),
                                     "json": json.loads(body or b"null")})
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def receiver(monkeypatch):
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TEST_ALERT_URL", server.url)
    monkeypatch.setenv("TEST_ALERT_TOKEN", TOKEN)
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def toy(tmp_path_factory):
    """A fresh toy project with the webhook alerts configured."""
    root, source = make_toy(tmp_path_factory.mktemp("upstream"), tmp_path_factory.mktemp("toy"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**params, **WEBHOOK}))
    return root


def _outcome(root, **found) -> None:
    (root / "toy_outcome.json").write_text(json.dumps(found))


def _text(request: dict) -> str:
    return request["json"]["text"]


def test_a_run_where_all_is_well_sends_nothing(toy, receiver):
    result = retrain.run(toy)
    assert result["registered"] and result["decision"]["decision"] == "champion"
    assert receiver.requests == [] and result["alerted"] is False


def test_a_version_not_promoted_sends_one_alert_with_both_numbers(toy, receiver):
    _outcome(toy, **CHALLENGER)
    result = retrain.run(toy)
    assert result["alerted"] is True
    [request] = receiver.requests  # one per run, not one per stage
    assert request["path"] == "/hook?key=abc"  # the URL as the environment gave it
    assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert "not promoted" in request["json"]["subject"]
    text = _text(request)
    assert "NOT PROMOTED: toy v1 stays @challenger: AP 0.2500 does not beat" in text
    assert ("AP 0.2500 (new) vs champion v1: 0.3000 on the same val split, 0.3200 as logged"
            in text)
    assert "- MLflow run r in sqlite:///toy.db" in text
    assert "- Prefect: not a flow run" in text and "models:/toy/1" in text


def test_drifted_data_sends_one_alert_naming_the_statistic(toy, receiver):
    _outcome(toy, **DRIFT)
    assert retrain.run(toy)["alerted"] is True
    [request] = receiver.requests
    assert request["json"]["subject"].endswith(": data drift")
    text = _text(request)
    assert "DATA DRIFT against the data of champion v1 (register.drift.gate off)" in text
    assert ("class balance: Jensen-Shannon distance 0.6541 > register.drift.class_balance 0.2"
            in text)
    assert "colour" not in text  # only what drifted


def test_a_failed_run_sends_one_alert_naming_the_stage_and_the_error(toy, receiver):
    params = yaml.safe_load((toy / "params.yaml").read_text())
    params["validate"]["max_boxes_per_image"] = 1
    (toy / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(retrain.StageFailed):
        retrain.run(toy)
    [request] = receiver.requests
    assert request["json"]["subject"].endswith(": failed")
    text = _text(request)
    assert "FAILED at step 'validate': the dataset failed validation" in text
    assert "images.boxes_per_image_in_bounds" in text


def test_a_failing_receiver_does_not_fail_the_run(toy, receiver, caplog):
    receiver.status = 500
    _outcome(toy, **CHALLENGER, **DRIFT)
    with caplog.at_level(logging.WARNING, logger=alerts.__name__):
        result = retrain.run(toy)
    assert result["registered"] and result["alerted"] is False
    assert len(receiver.requests) == 1  # tried once: both causes in one notification
    assert "not promoted, data drift" in receiver.requests[0]["json"]["subject"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "alert not sent through webhook to http://127.0.0.1" in warning and "500" in warning
    assert "key=abc" not in warning and TOKEN not in warning  # secrets stay out of logs


def test_no_url_in_the_environment_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("TEST_ALERT_URL", raising=False)
    watch = alerts.RunWatch(AlertsConfig(**WEBHOOK["alerts"]), tmp_path)
    with caplog.at_level(logging.WARNING, logger=alerts.__name__):
        assert watch.failed(RuntimeError("boom")) is False
    assert "TEST_ALERT_URL (alerts.url_env) is empty: alert not sent" in caplog.text


def test_an_unreadable_report_still_alerts_and_never_fails(tmp_path, receiver):
    watch = alerts.RunWatch(AlertsConfig(**WEBHOOK["alerts"]), tmp_path)
    odd = {"decision": "challenger", "model_uri": "models:/m/2"}  # no version, no numbers
    assert watch.finished({"registered": True, "decision": odd}) is True
    [request] = receiver.requests
    assert "the register report could not be read (KeyError('metric'))" in _text(request)


def test_the_apprise_channel_posts_through_apprise(tmp_path, receiver):
    """Any Apprise URL (mailto:// for e-mail); here json:// to the local receiver."""
    port = receiver.server_address[1]
    cfg = AlertsConfig(channel="apprise", url_env="TEST_ALERT_URL")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEST_ALERT_URL", f"json://127.0.0.1:{port}/apprise")
        assert alerts.RunWatch(cfg, tmp_path).failed(RuntimeError("stage 'x' failed")) is True
    [request] = receiver.requests
    assert request["path"] == "/apprise" and request["json"]["type"] == "failure"
    assert "FAILED before any step: stage 'x' failed" in request["json"]["message"]


def test_params_name_the_variable_never_the_secret(tmp_path):
    with pytest.raises(ConfigError, match="alerts.url_env: .* not an environment variable"):
        AlertsConfig(channel="slack", url_env="https://hooks.slack.com/services/T0/B0/X")
    with pytest.raises(ConfigError, match="alerts.channel: 'pager' is not one of"):
        AlertsConfig(channel="pager")
    (tmp_path / "params.yaml").write_text("alerts: {channel: teams, on_drift: false}\n")
    assert load(tmp_path / "params.yaml")["alerts"] == AlertsConfig(channel="teams",
                                                                     on_drift=False)


@pytest.mark.slow
def test_as_a_prefect_flow_run_the_alert_links_it_and_is_sent_once(prefect_server, toy,
                                                                    receiver):
    _outcome(toy, **CHALLENGER)
    state = retrain.retrain_flow(project_dir=str(toy), return_state=True)
    assert state.is_completed()
    [request] = receiver.requests
    run = pq.flow_runs("retrain", limit=1)[0]
    assert f"retrain {run.name} on " in request["json"]["subject"]
    assert "- Prefect flow run: http" in _text(request)
    assert f"/flow-runs/flow-run/{run.id}" in _text(request)
