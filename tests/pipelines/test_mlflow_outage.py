"""The MLflow tracking server down at the start, or going away mid-run, against a real
``mlflow server`` (SQLite store under tmp, a free loopback port) that the tests start and kill.

The stages retry with backoff (:func:`pipelines.tracking.retry`; kept short here through
``DETR_MLFLOW_ATTEMPTS`` / ``DETR_MLFLOW_BACKOFF_S``), then fail with one clear line naming
the server and what they were doing; training keeps its checkpoint and resumes; a registration
cut off after the version was created leaves no alias on it and the champion where it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from detr.evaluation import STAT_NAMES
from tests.pipelines.mlflow_server import BIN, MlflowServer, free_port
from tests.pipelines.project import TINY_PARAMS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A project-like folder: tiny params (2 epochs) and datasets of 64 images (16 steps an
    epoch) and of 4 (one step)."""
    from detr.data.synthetic import generate

    root = tmp_path_factory.mktemp("outage")
    generate(root / "data", num_train=4 * STEPS_PER_EPOCH, num_val=4, image_size=64,
             max_objects=3, seed=0, num_workers=1)
    generate(root / "small", num_train=4, num_val=2, image_size=64, max_objects=3, seed=1,
             num_workers=1)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        for key, value in values.items():
            if not isinstance(value, dict):
                params[section][key] = value
    params["train"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _env(root: Path, uri: str, attempts: int, backoff_s: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_API", "DVC_"))}
    env.update(MLFLOW_TRACKING_URI=uri, DVC_ROOT=str(root), OMP_NUM_THREADS="2",
               DETR_MLFLOW_ATTEMPTS=str(attempts), DETR_MLFLOW_BACKOFF_S=str(backoff_s))
    return env


def _train(workdir: Path, out: str, env: dict, data: str = "data") -> subprocess.Popen:
    """``python -m pipelines train`` in the background; stdout+stderr to ``<out>.log``."""
    with (workdir / f"{out}.log").open("wb") as log:
        return subprocess.Popen(
            [str(BIN / "python"), "-m", "pipelines", "train", "--data", data, "--out", out],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _log(workdir: Path, out: str) -> str:
    return (workdir / f"{out}.log").read_text(errors="replace")


def _wait_for(condition, what: str, timeout: float = 600.0) -> None:
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_down_at_start_fails_after_the_retries_with_a_clear_message(workdir):
    port = free_port()  # nothing listens there
    began = time.monotonic()
    proc = _train(workdir, "down", _env(workdir, f"http://127.0.0.1:{port}", 3, 0.5), "small")
    assert proc.wait(timeout=300) == 1
    elapsed = time.monotonic() - began
    output = _log(workdir, "down")
    assert (f"train: MLflow at http://127.0.0.1:{port} unreachable while trying to create the "
            f"run (3 attempts") in output, output
    assert output.count("retrying in") == 2 and "Traceback" not in output
    assert not (workdir / "down").exists()  # nothing trained, nothing written
    # MLflow's own HTTP retries (about 4 minutes per call by default) are cut down: the
    # stage's policy decides. Generous bound: imports plus 3 quick attempts.
    assert elapsed < 150, elapsed


def test_a_server_that_comes_up_during_the_retries_is_used(workdir, tmp_path):
    server = MlflowServer(tmp_path / "late")
    proc = _train(workdir, "late", _env(workdir, server.url, 10, 1.0), "small")
    try:
        # Start the server only once the stage has failed to reach it at least once.
        _wait_for(lambda: "retrying in" in _log(workdir, "late") or proc.poll() is not None,
                  "a failed first attempt")
        server.start()
        assert proc.wait(timeout=900) == 0, _log(workdir, "late")[-3000:]
        run_id = json.loads((workdir / "reports" / "mlflow_run.json").read_text())["run_id"]
        import mlflow

        run = mlflow.MlflowClient(server.url).get_run(run_id)
        assert run.data.params["train.epochs"] == "2" and "loss" in run.data.metrics
    finally:
        proc.kill()
        server.stop()


def test_server_killed_mid_training_stops_clearly_then_training_resumes(workdir, tmp_path):
    server = MlflowServer(tmp_path / "midway").start()
    env = _env(workdir, server.url, 3, 0.5)
    proc = _train(workdir, "midway", env)
    checkpoint = workdir / "midway" / "checkpoint.pth"
    try:
        _wait_for(lambda: checkpoint.is_file() or proc.poll() is not None, "epoch 0")
        server.kill()  # epoch 1 logs its step 20 soon: nobody answers
        assert proc.wait(timeout=600) == 1
    finally:
        proc.kill()
    output = _log(workdir, "midway")
    assert (f"train: MLflow at {server.url} unreachable while trying to log metrics "
            f"(3 attempts") in output, output[-3000:]
    assert "Traceback" not in output
    import torch

    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0  # kept, loadable

    back = MlflowServer(server.root, port=server.port).start()  # same store and port
    try:
        again = _train(workdir, "midway", env)
        assert again.wait(timeout=900) == 0, _log(workdir, "midway")[-3000:]
        assert "resuming after epoch 0" in _log(workdir, "midway")
        assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    finally:
        back.stop()


@pytest.fixture
def registry(tiny_dataset, tmp_path, monkeypatch):
    """A tiny checkpoint, a real server, and this process pointed at it (short retries)."""
    import mlflow

    from detr.train import fit
    from pipelines import tracking
    from tests.conftest import tiny_training

    model, loss, data, train = tiny_training(epochs=1)
    checkpoint = fit(model_cfg=model, loss_cfg=loss, data_cfg=data, train_cfg=train,
                     data_root=tiny_dataset, out_dir=tmp_path / "checkpoints",
                     progress=False, evaluate_at_end=False).checkpoint
    server = MlflowServer(tmp_path / "server").start()
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DETR_MLFLOW_ATTEMPTS", "2")
    monkeypatch.setenv("DETR_MLFLOW_BACKOFF_S", "0.2")
    monkeypatch.chdir(tmp_path)
    tracking.configure()
    tracking.start_run()
    env = SimpleNamespace(root=tmp_path, server=server, checkpoint=checkpoint, data=data,
                          train=train, dataset=tiny_dataset, client=mlflow.MlflowClient())
    yield env
    env.server.stop()  # the one running now (the test may have restarted it)


def _register(registry, value: float, report: str) -> dict:
    from pipelines.params import RegisterConfig
    from pipelines.stages import register

    metrics = registry.root / "metrics.json"
    metrics.write_text(json.dumps({n: value for n in STAT_NAMES}))
    per_class = registry.root / "per_class_ap.json"
    per_class.write_text("{}")
    return register.run(checkpoint=registry.checkpoint, metrics_path=metrics,
                        cfg=RegisterConfig(model_name="outage", metric="AP"),
                        data_cfg=registry.data, train_cfg=registry.train,
                        dataset_dir=registry.dataset, per_class_path=per_class,
                        report_path=registry.root / report)


def test_server_killed_between_version_and_alias_leaves_no_alias_on_it(registry, monkeypatch):
    from pipelines.stages import register

    assert _register(registry, 0.3, "first.json")["decision"] == "champion"
    original = register.register_version

    def then_the_server_dies(*args, **kwargs):
        version = original(*args, **kwargs)  # version 2 exists now
        registry.server.kill()
        return version

    monkeypatch.setattr(register, "register_version", then_the_server_dies)
    with pytest.raises(register.RegistrationError) as failure:
        _register(registry, 0.9, "second.json")  # would become the champion
    message = str(failure.value)
    assert "could not point outage@champion at version 2" in message
    assert f"MLflow at {registry.server.url} unreachable" in message
    assert not (registry.root / "second.json").exists()

    registry.server = MlflowServer(registry.server.root, port=registry.server.port).start()
    model = registry.client.get_registered_model("outage")
    assert model.aliases == {"champion": "1"}  # the champion stays; no alias on version 2
    versions = [str(v.version) for v in registry.client.search_model_versions("name = 'outage'")]
    aliases = {v: registry.client.get_model_version("outage", v).aliases for v in versions}
    assert aliases.pop("1") == ["champion"]
    assert all(a == [] for a in aliases.values())  # version 2, if its deletion failed too
