"""The registered champion behind the real ``mlflow models serve`` REST server.

Registers a tiny trained checkpoint in a SQLite registry under a temporary folder (as in
test_register.py), starts ``mlflow models serve -m models:/<name>@champion --env-manager local``
on a free 127.0.0.1 port as a subprocess and scores base64 images over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from detr.evaluation import STAT_NAMES
from detr.train import fit
from pipelines import tracking
from pipelines.params import RegisterConfig
from pipelines.stages import register
from tests.conftest import tiny_training

pytestmark = pytest.mark.slow
MODEL_NAME = "served"
START_TIMEOUT_S = 120.0
BIN = Path(sys.executable).parent  # the venv's bin: mlflow and python of the project


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, str]:
    """(HTTP status, body text) of a GET (no body) or a JSON POST; HTTP errors included."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def registry(tiny_dataset, tmp_path_factory):
    """``models:/served@champion`` in a SQLite registry under tmp; yields the env for the server."""
    import mlflow

    root = tmp_path_factory.mktemp("serving")
    model, loss, data, train = tiny_training(epochs=1)
    checkpoint = fit(model_cfg=model, loss_cfg=loss, data_cfg=data, train_cfg=train,
                     data_root=tiny_dataset, out_dir=root / "checkpoints", progress=False).checkpoint
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PREFECT_API_URL", raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("DVC_ROOT", str(root))
        mp.chdir(root)
        tracking.configure()
        mlflow.create_experiment(tracking.EXPERIMENT,
                                 artifact_location=(root / "mlartifacts").as_uri())
        tracking.start_run()
        metrics = root / "metrics" / "coco.json"
        metrics.parent.mkdir()
        metrics.write_text(json.dumps({n: 0.1 for n in STAT_NAMES}))
        report = register.run(checkpoint=checkpoint, metrics_path=metrics, data_cfg=data,
                              cfg=RegisterConfig(model_name=MODEL_NAME, metric="AP", min_ap=0.0),
                              report_path=root / "reports" / "register.json")
        assert report["decision"] == "champion"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)
    return SimpleNamespace(root=root, env=env, dataset=tiny_dataset)


@pytest.fixture(scope="module")
def server(registry):
    """The scoring server's base URL; the whole process group is killed on teardown."""
    port = _free_port()
    log_path = registry.root / "serve.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=registry.env, cwd=registry.root, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n"
                            f"{log_path.read_text()[-4000:]}")
            try:
                if _request(f"{url}/ping", timeout=5)[0] == 200:
                    break
            except OSError:  # not listening yet
                pass
            if time.monotonic() - started > START_TIMEOUT_S:
                pytest.fail(f"no 200 from /ping within {START_TIMEOUT_S:.0f} s:\n"
                            f"{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        print(f"mlflow models serve ready in {time.monotonic() - started:.1f} s")
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def _jpeg_b64(path: Path) -> tuple[str, tuple[int, int]]:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode("ascii"), rgb.size


def _payload(*images: str) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[img] for img in images]},
            "params": {"score_threshold": 0.0, "top_k": 5}}


def test_served_champion_returns_detections(server, registry):
    val = sorted((registry.dataset / "images" / "val").iterdir())[0]
    image, (width, height) = _jpeg_b64(val)
    status, text = _request(f"{server}/invocations", _payload(image))
    assert status == 200, text
    predictions = json.loads(text)["predictions"]
    assert len(predictions) == 1
    dets = json.loads(predictions[0]["detections"])
    names = {c["name"]: c["id"] for c in json.loads(
        (registry.dataset / "annotations" / "val.json").read_text())["categories"]}
    assert 0 < len(dets) <= 5
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    for det in dets:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert 0.0 <= det["score"] <= 1.0
        assert isinstance(det["category_id"], int)
        assert names.get(det["category"]) == det["category_id"]


def test_served_champion_rejects_a_non_image(server, registry):
    val = sorted((registry.dataset / "images" / "val").iterdir())[0]
    image, _ = _jpeg_b64(val)
    status, text = _request(f"{server}/invocations", _payload(image, "not an image"))
    assert status == 400, text  # MLflow maps any exception in predict() to BAD_REQUEST
    error = json.loads(text)
    assert error["error_code"] == "BAD_REQUEST"
    # The generic message says "unexpected error"; the ValueError naming the row is only in
    # the stack trace MLflow returns with it.
    assert "row 1: 'image' is not valid base64" in error["stack_trace"]
