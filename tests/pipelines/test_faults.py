"""Faults survived by the pipeline: `dvc repro` killed mid-epoch, a loss that turns NaN.

One temporary copy of the project (git + DVC, tiny params as in test_dvc_pipeline.py, 64
training images = 16 steps an epoch, 2 epochs), prepared and validated once for the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.pipelines.project import BIN, TINY_PARAMS, make_project, project_env
from tests.pipelines.project import ran_stages as _ran
from tests.pipelines.project import sh as _sh

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MODEL = "detr-faults"
STEPS_PER_EPOCH = 16
PARAMS = {**TINY_PARAMS,
          "prepare": {"demo": {"num_train": 4 * STEPS_PER_EPOCH, "num_val": 4,
                               "image_size": 64, "max_objects": 3}},
          "train": {**TINY_PARAMS["train"], "epochs": 2},
          "register": {"model_name": MODEL, "min_improvement": 0.0, "min_ap": 0.0}}
KILL_TIMEOUT_S = 600.0


@pytest.fixture
def project(tmp_path_factory):
    """A project copy with its dataset prepared and validated; MLflow in its mlflow.db. One
    per test: the NaN test leaves diverging params and no checkpoint.pth behind, which the
    SIGKILL test, run after it, would train with (tests run in random order)."""
    root = tmp_path_factory.mktemp("faults")
    env = project_env()
    make_project(root, env, PARAMS)
    _sh([str(BIN / "dvc"), "repro", "validate"], root, env)
    return SimpleNamespace(root=root, env=env, dvc=str(BIN / "dvc"))


def _checkpoint(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "checkpoint.pth", map_location="cpu",
                      weights_only=True)


def _logged_steps(root: Path, run_id: str) -> int:
    """The last optimiser step of run ``run_id`` whose loss reached the project's mlflow.db."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    try:
        return max((m.step for m in client.get_metric_history(run_id, "loss")), default=0)
    except Exception:  # the writer holds the database this instant: ask again
        return 0


def _run_id(root: Path) -> str | None:
    try:
        return json.loads((root / "reports" / "mlflow_run.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def _kill_mid_epoch(project) -> None:
    """Start `dvc repro train`; SIGKILL its process group once epoch 0's checkpoint exists and
    epoch 1 has logged step 20 (of 17..32): the kill lands in the middle of epoch 1."""
    log = project.root.parent / "killed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([project.dvc, "repro", "train"], cwd=project.root,
                                env=project.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    target = STEPS_PER_EPOCH + 4
    began = time.monotonic()
    try:
        while True:
            assert proc.poll() is None, f"train ended before the kill:\n{log.read_text()[-3000:]}"
            assert time.monotonic() - began < KILL_TIMEOUT_S, log.read_text()[-3000:]
            run_id = _run_id(project.root)
            if run_id and _logged_steps(project.root, run_id) >= target:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert _checkpoint(project.root)["epoch"] == 0, "the kill came after epoch 1 had ended"


def _weights(ckpt: dict) -> dict[str, torch.Tensor]:
    return ckpt["model"]


def test_sigkill_mid_epoch_then_repro_resumes_to_the_same_weights(project):
    root = project.root
    _kill_mid_epoch(project)

    resumed = _sh([project.dvc, "repro", "train"], root, project.env)
    assert _ran(resumed.stdout) == {"train"}, resumed.stdout
    assert "checkpoint.pth: resuming after epoch 0" in resumed.stdout + resumed.stderr
    after_resume = _checkpoint(root)
    assert after_resume["epoch"] == 1 and len(after_resume["history"]) == 2
    run = _mlflow_run(project, _run_id(root))
    assert run["tags"].get("resumed_from_epoch") == "1"
    assert len((root / "plots" / "train_loss.csv").read_text().splitlines()) == 1 + 2

    # The reference: the same stage, uninterrupted, from no checkpoint.
    (root / "checkpoints" / "checkpoint.pth").rename(root.parent / "resumed.pth")
    _sh([project.dvc, "repro", "--force", "--single-item", "train"], root, project.env)
    reference = _checkpoint(root)
    assert reference["epoch"] == 1
    a, b = _weights(after_resume), _weights(reference)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"  # bit-identical
    assert after_resume["history"] == reference["history"]


def _mlflow_run(project, run_id: str) -> dict:
    script = ("import json, sys, mlflow\n"
              "from pipelines import tracking\n"
              "tracking.configure()\n"
              "c = mlflow.MlflowClient()\n"
              "r = c.get_run(sys.argv[1])\n"
              "vs = c.search_model_versions(\"name='" + MODEL + "'\")\n"
              "champ = tracking.retry(lambda: c.get_registered_model('" + MODEL + "'),"
              " what='read').aliases.get('champion') if vs else None\n"
              "print(json.dumps({'status': r.info.status, 'tags': r.data.tags,"
              " 'versions': sorted(str(v.version) for v in vs),"
              " 'aliases': {str(v.version): sorted(v.aliases) for v in vs},"
              " 'champion': None if champ is None else str(champ)}))\n")
    done = _sh([str(BIN / "python"), "-c", script, run_id], project.root,
               {**project.env, "DVC_ROOT": str(project.root)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_nan_loss_stops_the_pipeline_and_keeps_the_champion(project):
    root = project.root
    first = _sh([project.dvc, "repro"], root, project.env)  # evaluate + register: a champion
    assert {"evaluate", "register"} <= _ran(first.stdout)
    good_run = _run_id(root)
    before = _mlflow_run(project, good_run)
    assert before["champion"] == before["versions"][-1]
    kept = {p: (root / p).read_bytes() for p in (
        "checkpoints/checkpoint.pth", "metrics/coco.json", "reports/register.json")}

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["lr"] = params["train"]["lr_backbone"] = 1.0e20  # diverges at once
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run([project.dvc, "repro"], cwd=root, env=project.env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode != 0
    assert _ran(done.stdout) == {"train"}, done.stdout  # evaluate and register never ran
    output = done.stdout + done.stderr
    assert "train: epoch 0, step" in output and "NaN" in output, output[-3000:]
    assert "Traceback" not in output

    # The checkpoint of the other params is kept aside, the outputs downstream untouched.
    assert (root / "checkpoints" / "checkpoint.stale.pth").read_bytes() == kept.pop(
        "checkpoints/checkpoint.pth")
    assert not (root / "checkpoints" / "checkpoint.pth").exists()
    for path, content in kept.items():
        assert (root / path).read_bytes() == content, path
    failed_run = _run_id(root)
    assert failed_run != good_run
    after = _mlflow_run(project, failed_run)
    assert after["status"] == "FAILED"
    assert (after["versions"], after["champion"]) == (before["versions"], before["champion"])
    assert after["aliases"] == before["aliases"]
