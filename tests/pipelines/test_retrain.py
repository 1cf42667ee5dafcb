"""The retrain flow's logic on a small DVC project with stand-in stages (no torch, seconds).

Real DVC (stage skipping, dvc.lock, `dvc update` of an imported folder, `dvc push` to a local
remote) and, where marked, a real Prefect test server (task runs, logs, artifacts, the Failed
state of a bad dataset). The real stages under a real worker: test_servers.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import prefect_queries as pq
import pytest
import yaml

from pipelines.ops import retrain
from tests.pipelines.toy_project import BIN, STAGES, make_toy, sh


@pytest.fixture
def toy(tmp_path_factory):
    """A DVC project whose raw data is a folder imported with `dvc import-url`: a fresh one
    for each test (the flow test adds a remote and trains; tests run in random order)."""
    return make_toy(tmp_path_factory.mktemp("upstream"), tmp_path_factory.mktemp("toy"))


def test_plan_orders_stages_by_dependency_and_finds_imports(toy):
    root, _ = toy
    plan = retrain.make_plan(root)
    assert list(plan.stages) == STAGES
    assert plan.imports == ("data/raw.dvc",) and plan.remote is None and not plan.warnings


def test_a_path_source_missing_from_prepare_deps_is_warned(tmp_path):
    (tmp_path / "params.yaml").write_text("prepare:\n  source: data/elsewhere\n")
    assert retrain._source_warnings(tmp_path, ["data/elsewhere/..", "data"]) == []
    warnings = retrain._source_warnings(tmp_path, ["data/raw", "toy.py"])
    assert len(warnings) == 1 and "data/elsewhere" in warnings[0] and "dvc.yaml" in warnings[0]


def test_the_failure_message_names_what_the_real_validate_stage_found(tiny_dataset, tmp_path):
    from pipelines.params import ValidateConfig
    from pipelines.stages.validate import run as validate

    report = validate(tiny_dataset, ValidateConfig(max_boxes_per_image=1, workers=1),
                      tmp_path / "validation")
    assert not report.success
    message = retrain.validation_failure(tmp_path / "validation/validation.json")
    assert message.startswith("the dataset failed validation")
    for outcome in report.failed:
        assert f"FAILED {outcome.table}.{outcome.name} ({outcome.expectation})" in message
    assert "images.boxes_per_image_in_bounds" in message
    assert retrain.validation_failure(tmp_path / "missing.json") is None


def test_a_second_run_is_refused_while_one_holds_the_lock(toy):
    root, _ = toy
    lock_before = (root / "dvc.lock").read_bytes() if (root / "dvc.lock").exists() else None
    with retrain.retrain_lock(root, 0):
        with pytest.raises(retrain.RetrainBusy, match=rf"pid {os.getpid()} .*refused"):
            retrain.run(root, lock_wait_s=0.5)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
        done = subprocess.run([sys.executable, "-m", "pipelines", "retrain", "--project",
                               str(root), "--lock-wait", "0"], capture_output=True, text=True,
                              env={**env, "PIPELINES_STAGE_FLOWS": "0"}, timeout=300)
    assert done.returncode == 3, done.stderr
    assert "another retrain is still running" in done.stderr and "refused" in done.stderr
    now = (root / "dvc.lock").read_bytes() if (root / "dvc.lock").exists() else None
    assert now == lock_before and not (root / "train_runs.log").exists()  # nothing ran


@pytest.mark.slow
def test_retrain_flow_runs_stale_stages_as_tasks(prefect_server, toy, tmp_path_factory):
    root, source = toy
    first = retrain.retrain_flow(project_dir=str(root))
    assert first["stages"] == dict.fromkeys(STAGES, "ran") and first["registered"]
    assert first["pushed"] is False  # no remote yet
    run = pq.flow_runs("retrain", limit=1)[0]
    assert run.state.is_completed()
    tasks = pq.task_runs(run.id)
    assert [t.name for t in tasks] == ["update-data", *STAGES, "push", "decision"]
    assert all(t.state.is_completed() for t in tasks)
    messages = pq.wait_for_logs(run.id, "toy train: 2 epochs")
    assert any("toy train: 2 epochs" in m for m in messages)  # the stage's own output
    assert any("Running stage 'train'" in m for m in messages)  # DVC's
    train_logs = [log for log in pq.logs(run.id) if log.task_run_id == tasks[3].id]
    assert any("toy train" in log.message for log in train_logs)  # under the train task
    arts = {a.key: a for a in pq.artifacts(run.id)}
    assert set(arts) == {"coco-ap-ar", "registration"}
    rows = json.loads(arts["coco-ap-ar"].data) if isinstance(arts["coco-ap-ar"].data, str) \
        else arts["coco-ap-ar"].data
    assert rows[0]["metric"] == "AP" and rows[0]["value"] == 0.25 and len(rows) == 12
    assert "models:/toy/1" in arts["registration"].data

    # New upstream data and a DVC remote: the import is updated, everything downstream re-runs
    # and the outputs are pushed.
    (source / "b.jpg").write_text("b")
    remote = tmp_path_factory.mktemp("remote")
    sh([str(BIN / "dvc"), "remote", "add", "-d", "local", str(remote)], root)
    second = retrain.retrain_flow(project_dir=str(root))
    assert second["stages"] == dict.fromkeys(STAGES, "ran") and second["pushed"]
    assert json.loads((root / "data/dataset/files.json").read_text()) == ["a.jpg", "b.jpg"]
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"

    # Nothing changed: DVC skips every stage, nothing is registered, the lock file stays.
    lock = (root / "dvc.lock").read_bytes()
    third = retrain.retrain_flow(project_dir=str(root))
    assert third["stages"] == dict.fromkeys(STAGES, "skipped") and not third["registered"]
    assert "no new model" in third["message"] and "models:/toy/2" in third["message"]
    assert (root / "dvc.lock").read_bytes() == lock
    assert (root / "train_runs.log").read_text().split() == ["2", "2"]
    assert "Data and pipelines are up to date" in sh([str(BIN / "dvc"), "status"], root)


@pytest.mark.slow
def test_failed_validation_fails_the_run_naming_the_expectation(prefect_server, toy):
    root, _ = toy
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["validate"]["max_boxes_per_image"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "checkpoints").mkdir()
    (root / "checkpoints/model.txt").write_text("the model of an earlier run")
    checkpoint = (root / "checkpoints/model.txt").read_bytes()
    state = retrain.retrain_flow(project_dir=str(root), return_state=True)
    assert state.is_failed()
    assert "images.boxes_per_image_in_bounds" in state.message, state.message
    assert "images.ids_unique" not in state.message.split("FAILED")[0]  # only the failed one
    run = pq.flow_runs("retrain", limit=1)[0]
    assert run.state.is_failed() and "boxes_per_image_in_bounds" in run.state.message
    names = {t.name: t.state.type.value for t in pq.task_runs(run.id)}
    assert names["validate"] == "FAILED" and "train" not in names  # stopped before training
    assert (root / "checkpoints/model.txt").read_bytes() == checkpoint
