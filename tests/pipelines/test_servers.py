"""The servers for real, on loopback: `make serve`'s scripts in a tiny copy of the project, the
scheduled `retrain` deployment, runs triggered through the Prefect API and run by the worker,
MLflow's registry, and a browser on both UIs.

One set of servers, one project and one first run for the whole module (module fixtures); the
tests run in file order and the last ones change the project (new params, more runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import prefect_queries as pq
import psutil
import pytest
import yaml

from tests.pipelines.project import BIN, ROOT, STAGES, TINY_PARAMS, make_project

MODEL = TINY_PARAMS["register"]["model_name"]
SCREENSHOTS = ROOT / "reports" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_S = 1200

pytestmark = pytest.mark.slow


@dataclass
class Served:
    root: Path
    env: dict
    state: dict
    start_s: float


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sh(cmd: list[str], root: Path, env: dict, timeout: int = 600) -> str:
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`infra/serve.sh` in a tiny project copy on free ports; `infra/stop.sh` afterwards."""
    root = tmp_path_factory.mktemp("served")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "DVC_", "PIPELINES_"))}
    env.update(PATH=f"{BIN}:{env['PATH']}", PYTHON=sys.executable, DVC_NO_ANALYTICS="1",
               OMP_NUM_THREADS="2", PREFECT_PORT=str(_free_port()),
               MLFLOW_PORT=str(_free_port()), PREFECT_WORKER_QUERY_SECONDS="2",
               SERVE_TIMEOUT_S="300", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    make_project(root, env)
    began = time.monotonic()
    try:
        out = _sh(["infra/serve.sh"], root, env)
        start_s = time.monotonic() - began
        print(f"\nmake serve: {start_s:.1f} s\n{out}")
        state = json.loads((root / ".servers/state.json").read_text())
        yield Served(root=root, env=env, state=state, start_s=start_s)
    finally:
        subprocess.run(["infra/stop.sh"], cwd=root, env=env, timeout=120)


@pytest.fixture(scope="module")
def api(served):
    """The test process talks to the served Prefect API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: served.state["prefect_api_url"]}):
        yield served.state["prefect_api_url"]


@pytest.fixture(scope="module")
def first_run(served, api):
    """`python -m pipelines deploy` (finds the servers by itself), then one run of the
    deployment triggered through the Prefect API and run by the worker, to its end."""
    out = _sh([sys.executable, "-m", "pipelines", "deploy"], served.root, served.env)
    assert "created retrain/weekly" in out, out
    with pq.client() as client:
        deployment = client.read_deployment_by_name("retrain/weekly")
        run = client.create_flow_run_from_deployment(deployment.id)
    began = time.monotonic()
    final = pq.wait_final(run.id, RUN_TIMEOUT_S)
    print(f"\nfirst deployment run: {time.monotonic() - began:.1f} s, {final.state_name}")
    return deployment, final


def test_serve_starts_everything_on_loopback_and_is_idempotent(served):
    state = served.state
    for key in ("prefect_url", "mlflow_url"):
        assert state[key].startswith("http://127.0.0.1:"), state
    for name, pid in state["pids"].items():
        proc = psutil.Process(pid)
        assert proc.is_running(), name
        listening = {c.laddr.ip for p in [proc, *proc.children(recursive=True)]
                     for c in p.net_connections(kind="inet") if c.status == "LISTEN"}
        assert listening <= {"127.0.0.1"}, (name, listening)  # nothing on other interfaces
    again = _sh(["infra/serve.sh"], served.root, served.env)
    assert "already running: prefect, mlflow, worker" in again
    assert json.loads((served.root / ".servers/state.json").read_text())["pids"] == state["pids"]


def test_a_deployment_run_completes_with_artifacts_and_a_registered_model(served, first_run):
    deployment, run = first_run
    assert run.state.is_completed(), run.state.message
    tasks = pq.task_runs(run.id)
    assert [t.name for t in tasks] == ["update-data", *STAGES, "push", "decision"]
    assert all(t.state.is_completed() for t in tasks)
    messages = pq.wait_for_logs(run.id, "Running stage 'train'")
    assert any("Running stage 'train'" in m for m in messages)  # the stages' logs are there
    arts = {a.key: a for a in pq.artifacts(run.id)}
    assert {"coco-ap-ar", "registration"} <= set(arts)
    assert f"models:/{MODEL}/1" in arts["registration"].data
    assert "@champion" in arts["registration"].data

    # The deployment: params' cron, one run at a time.
    schedule = deployment.schedules[0]
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * 1", "UTC")
    assert schedule.active and not deployment.paused
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"

    # MLflow: the worker's stages logged to the server; the run has the AP metrics, the
    # registry the version with its alias; the SQLite file behind the server is the same store.
    import mlflow

    run_info = json.loads((served.root / "reports/mlflow_run.json").read_text())
    assert run_info["tracking_uri"] == served.state["mlflow_url"]
    for uri in (served.state["mlflow_url"], f"sqlite:///{served.root / 'mlflow.db'}"):
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        # Version 1 is this deployment run's (other tests of the module, in random order, may
        # have trained and registered since: reports/mlflow_run.json names the latest run).
        first = client.get_model_version(MODEL, "1")
        metrics = client.get_run(first.run_id).data.metrics
        assert {"AP", "AP50", "AP75", "AR_100"} <= set(metrics), (uri, sorted(metrics))
        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert str(champion.version) == "1" and champion.run_id == first.run_id
    assert "Data and pipelines are up to date" in _sh([str(BIN / "dvc"), "status"],
                                                      served.root, served.env)


def test_the_uis_show_the_champion_and_the_scheduled_deployment(served, first_run):
    if not CHROMIUM.exists():
        message = "Debian's chromium is not installed (make browser-deps)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    deployment, run = first_run
    assert run.state.is_completed()
    run_info = json.loads((served.root / "reports/mlflow_run.json").read_text())
    ap = json.loads((served.root / "metrics/coco.json").read_text())["AP"]
    mlflow_url, prefect_url = served.state["mlflow_url"], served.state["prefect_url"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900})
        page = browser.new_page()
        page.set_default_timeout(60_000)

        page.goto(f"{mlflow_url}/#/models/{MODEL}")
        body = page.locator("body")
        _close_assistant(page)
        expect(body).to_contain_text(re.compile(r"Version 1"))
        expect(body).to_contain_text(re.compile(r"@\s*champion"))
        page.screenshot(path=SCREENSHOTS / "mlflow_registered_model.png")

        page.goto(f"{mlflow_url}/#/models/{MODEL}/versions/1")  # its description: the card
        expect(body).to_contain_text(f"Model card: {MODEL} version 1")
        expect(body).to_contain_text("Known limits (measured)")
        page.screenshot(path=SCREENSHOTS / "mlflow_model_card.png")

        page.goto(f"{mlflow_url}/#/experiments/{_experiment_id(served, run_info)}/runs/"
                  f"{run_info['run_id']}")
        page.get_by_placeholder("Search metrics").fill("AP")
        # the final AP50 row, not the val_AP50 curve logged during training
        expect(page.get_by_role("row").filter(has_text=re.compile(r"^\s*AP50"))).to_have_count(1)
        shown = [r.split("\n") for r in page.get_by_role("row").all_inner_texts()]
        ap_rows = [cells for cells in shown if cells[0] == "AP"]
        assert len(ap_rows) == 1 and float(ap_rows[0][1]) == pytest.approx(ap, abs=1e-3), shown
        page.get_by_placeholder("Search metrics").scroll_into_view_if_needed()
        page.screenshot(path=SCREENSHOTS / "mlflow_run_metrics.png")

        page.goto(f"{prefect_url}/deployments/deployment/{deployment.id}")
        body = page.locator("body")
        expect(page.get_by_text("params.yaml: 0 3 * * 1 (UTC)")).to_be_visible()
        expect(body).to_contain_text("retrain")
        expect(body).to_contain_text("weekly")
        card = page.locator("div").filter(has=page.get_by_text(run.name, exact=True)).filter(
            has_text="Task runs").last  # the run's card in the deployment's run list
        expect(card).to_contain_text("Completed")
        expect(card).to_contain_text("8 Task runs")  # update-data, 5 stages, push, decision
        expect(body).to_contain_text("Scheduled for")  # the next run the cron made
        page.screenshot(path=SCREENSHOTS / "prefect_deployment.png")
        browser.close()
    print(f"\nbrowser checks: {time.monotonic() - began:.1f} s; screenshots in {SCREENSHOTS}")


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its assistant panel beside every page: close it for the screenshots."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.get_by_role("button", name="Close", exact=True).first.click(timeout=15_000)
    except PlaywrightTimeout:  # no panel (another MLflow build): nothing to close
        pass


def _experiment_id(served: Served, run_info: dict) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=served.state["mlflow_url"])
    return client.get_run(run_info["run_id"]).info.experiment_id


def test_make_deploy_again_keeps_what_was_changed_in_the_ui(served, first_run, api):
    """Pause the deployment, switch its schedule off, add schedules (one named, one not), as
    in the UI; `make deploy` after a cron change in params.yaml applies the new cron to its own
    schedule and keeps the rest."""
    from prefect.client.schemas.schedules import IntervalSchedule

    deployment, _ = first_run
    with pq.client() as client:
        client.pause_deployment(deployment.id)
        ours = client.read_deployment(deployment.id).schedules[0]
        client.update_deployment_schedule(deployment.id, ours.id, active=False)
        client.create_deployment_schedules(
            deployment.id, [(IntervalSchedule(interval=3600), True)], slug="hourly")
    for cron, added in (("30 4 * * 2", None), ("0 3 * * 1", IntervalSchedule(interval=7200))):
        if added:  # without a name: the server then replaces the whole list
            with pq.client() as client:
                client.create_deployment_schedules(deployment.id, [(added, True)])
        _set_params(served.root, "schedule", "cron", cron)
        out = _sh([sys.executable, "-m", "pipelines", "deploy"], served.root, served.env)
        assert "updated retrain/weekly" in out and "PAUSED" in out, out
        with pq.client() as client:
            again = client.read_deployment(deployment.id)
        mine = [s for s in again.schedules if (s.slug or "").startswith("params.yaml")]
        assert [s.slug for s in mine] == [f"params.yaml: {cron} (UTC)"], again.schedules
        assert mine[0].schedule.cron == cron and not mine[0].active
        others = sorted(s.schedule.interval.total_seconds() for s in again.schedules
                        if s not in mine)
        assert others == ([3600] if not added else [3600, 7200]), again.schedules
        assert again.paused and again.global_concurrency_limit.limit == 1
    with pq.client() as client:  # back as it was for the next test
        for schedule in again.schedules:
            if schedule not in mine:
                client.delete_deployment_schedule(deployment.id, schedule.id)
        client.update_deployment_schedule(deployment.id, mine[0].id, active=True)
        client.resume_deployment(deployment.id)


def _set_params(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_two_retrain_runs_triggered_together_never_overlap(served, first_run):
    """Two deployment runs and one started outside the deployment (the command, a flow run
    too since the servers are up), all at once after a params change: the deployment's
    concurrency limit queues one, the flow's lock makes the others wait; exactly one trains;
    dvc.lock, the DVC cache and the registry stay consistent."""
    deployment, _ = first_run
    root, env = served.root, served.env
    _set_params(root, "train", "lr", 0.0005)  # the next run must train a new model
    with pq.client() as client:
        triggered = [client.create_flow_run_from_deployment(deployment.id) for _ in range(2)]
    cli = subprocess.Popen([sys.executable, "-m", "pipelines", "retrain"], cwd=root, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finals = [pq.wait_final(r.id, RUN_TIMEOUT_S) for r in triggered]
    out, _ = cli.communicate(timeout=RUN_TIMEOUT_S)
    assert cli.returncode == 0, out[-4000:]
    assert all(r.state.is_completed() for r in finals), [r.state for r in finals]
    cli_runs = [r for r in pq.flow_runs("retrain") if r.deployment_id is None]
    assert len(cli_runs) == 1 and cli_runs[0].state.is_completed()
    runs = [*finals, cli_runs[0]]

    spans = sorted(_span(r.id) for r in runs)  # when each run did its steps (held the lock)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    assert any("AwaitingConcurrencySlot" in pq.states(r.id) for r in finals)  # Prefect queued one
    logs = {r.id: pq.wait_for_logs(r.id, "Finished in state") for r in runs}
    assert any("another retrain is running" in m for msgs in logs.values() for m in msgs)
    trained = [r for r in runs if any("Running stage 'train'" in m for m in logs[r.id])]
    assert len(trained) == 1, [r.name for r in trained]

    assert "Data and pipelines are up to date" in _sh([str(BIN / "dvc"), "status"], root, env)
    _check_cache(root)
    import mlflow

    uri = served.state["mlflow_url"]
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert client.get_registered_model(MODEL).aliases == {"champion": "1", "challenger": "2"}


def _span(flow_run_id) -> tuple:
    tasks = pq.task_runs(flow_run_id)
    return (min(t.start_time for t in tasks), max(t.end_time for t in tasks))


def _check_cache(root: Path) -> None:
    """Every cached output dvc.lock records is in the cache, and each cached file hashes to
    its name (a half-written or clobbered cache object would not)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    cache = root / ".dvc/cache/files/md5"
    uncached = _uncached(root)
    checked = 0
    for stage in lock.values():
        for out in stage.get("outs", []):
            if out["path"] in uncached:
                continue
            md5 = out["md5"]
            obj = cache / md5[:2] / md5[2:]
            assert obj.exists(), (out["path"], obj)
            entries = json.loads(obj.read_text()) if md5.endswith(".dir") else \
                [{"md5": md5, "relpath": out["path"]}]
            for entry in entries:
                blob = cache / entry["md5"][:2] / entry["md5"][2:]
                assert hashlib.md5(blob.read_bytes()).hexdigest() == entry["md5"], entry
                checked += 1
    assert checked > 10, checked


def _uncached(root: Path) -> set[str]:
    """Outputs dvc.yaml marks `cache: false` (they stay in the workspace only)."""
    paths = set()
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for key in ("outs", "metrics", "plots"):
            for item in stage.get(key, []):
                if isinstance(item, dict):
                    paths |= {p for p, opts in item.items() if (opts or {}).get("cache") is False}
    return paths


@pytest.mark.last  # the other tests of this module use the servers it stops
def test_stop_stops_everything_and_is_idempotent(served):
    pids = served.state["pids"]
    out = _sh(["infra/stop.sh"], served.root, served.env, timeout=180)
    assert "stopped: worker, mlflow, prefect" in out, out
    for name, pid in pids.items():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", name
    for url in (served.state["prefect_url"], served.state["mlflow_url"]):
        port = int(url.rsplit(":", 1)[1])
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"{url} still answers"
    assert not (served.root / ".servers/state.json").exists()
    assert "nothing was running" in _sh(["infra/stop.sh"], served.root, served.env)
