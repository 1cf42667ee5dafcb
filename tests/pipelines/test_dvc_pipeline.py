"""End to end: `dvc repro` in a temporary copy of the project (git init + commit), tiny params."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ("prepare", "validate", "train", "evaluate", "register")

TINY_PARAMS = {
    "prepare": {"demo": {"num_train": 16, "num_val": 4, "image_size": 64, "max_objects": 3}},
    "validate": {"workers": 1},
    "model": {"backbone": "resnet18", "norm": "bn", "freeze_stem": False, "hidden_dim": 32,
              "nheads": 2, "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 64,
              "dropout": 0.0, "num_queries": 8, "query_groups": 2},
    "data": {"scales": [64], "max_size": 64, "crop_scales": [64], "crop_size": [48, 64],
             "num_workers": 0},
    "train": {"epochs": 1, "batch_size": 4, "lr": 1.0e-3, "lr_backbone": 1.0e-3,
              "warmup_steps": 0, "precision": "fp32", "channels_last": False, "device": "cpu"},
    "evaluate": {"batch_size": 4, "num_examples": 2},
    # A second version can't beat the first by 0.5 AP: it must become @challenger.
    "register": {"model_name": "detr-e2e", "min_improvement": 0.5},
}


def _project_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in listed.splitlines() if (ROOT / f).is_file()]


def _sh(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def _ran(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git + DVC project copied from this checkout, params made tiny, committed."""
    root = tmp_path_factory.mktemp("project")
    for rel in _project_files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, root / rel)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_API", "DVC_"))}
    env.update(PATH=f"{BIN}:{env['PATH']}", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="2",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    _sh(["git", "init", "-q"], root, env)
    _sh(["git", "add", "-A"], root, env)
    _sh(["git", "commit", "-qm", "init"], root, env)
    return root, env


@pytest.mark.slow
def test_dvc_repro_end_to_end(project):
    root, env = project
    dvc = str(BIN / "dvc")
    first = _sh([dvc, "repro"], root, env)
    assert _ran(first.stdout) == set(STAGES), first.stdout
    for path in ("data/dataset/annotations/train.json", "reports/validation/validation.json",
                 "checkpoints/checkpoint.pth", "metrics/coco.json", "plots/train_loss.csv",
                 "reports/evaluation/coco_table.txt", "reports/register.json"):
        assert (root / path).exists(), path
    coco = json.loads((root / "metrics/coco.json").read_text())
    assert len(coco) == 12 and "AP" in coco
    reg = json.loads((root / "reports/register.json").read_text())
    assert reg["version"] in (1, "1") and reg["decision"] == "champion"

    again = _sh([dvc, "repro"], root, env)
    assert _ran(again.stdout) == set(), again.stdout  # nothing changed: nothing runs

    exp = _sh([dvc, "exp", "run", "-S", "train.lr=0.0005"], root, env)
    assert _ran(exp.stdout) == {"train", "evaluate", "register"}, exp.stdout
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["lr"] == 0.0005
    reg = json.loads((root / "reports/register.json").read_text())
    assert reg["decision"] == "challenger" and str(reg["champion_version_before"]) == "1"
    metrics = _sh([dvc, "metrics", "show"], root, env).stdout
    assert "metrics/coco.json" in metrics and "AP50" in metrics

    _check_registry(root, env)
    _bad_data_stops_before_training(root, env)


def _bad_data_stops_before_training(root: Path, env: dict) -> None:
    """A dataset that fails validation stops `dvc repro` before train; nothing downstream
    (checkpoint, registration report, registry) changes."""
    before = {p: (root / p).read_bytes() for p in ("checkpoints/checkpoint.pth",
                                                   "reports/register.json")}
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["validate"]["max_boxes_per_image"] = 1  # the demo has images with 2-3 boxes
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode != 0
    assert _ran(done.stdout) == {"validate"}, done.stdout
    assert "FAILED images.boxes_per_image_in_bounds" in done.stderr  # names the expectation
    for path, content in before.items():
        assert (root / path).read_bytes() == content, path
    _check_registry(root, env)  # still 2 versions, champion still version 1


def _check_registry(root: Path, env: dict) -> None:
    script = (
        "import json, mlflow\n"
        "from pipelines import tracking\n"
        "tracking.configure()\n"
        "c = mlflow.MlflowClient()\n"
        "vs = c.search_model_versions(\"name='detr-e2e'\")\n"
        "champ = c.get_model_version_by_alias('detr-e2e', 'champion')\n"
        "run = c.get_run(json.load(open('reports/mlflow_run.json'))['run_id'])\n"
        "print(json.dumps({'versions': len(vs), 'champion': champ.version,"
        " 'metrics': sorted(run.data.metrics), 'params': len(run.data.params),"
        " 'tags': run.data.tags,"
        " 'artifacts': [a.path for a in c.list_artifacts(run.info.run_id)]}))\n"
    )
    out = _sh([sys.executable, "-c", script], root, {**env, "DVC_ROOT": str(root)}).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["versions"] == 2 and str(info["champion"]) == "1"  # int from SQLite
    assert {"AP", "AP50", "AR_100", "loss", "loss_giou", "lr"} <= set(info["metrics"])
    assert info["params"] > 40
    assert {"dataset.train.images", "dataset.val.boxes"} <= set(info["metrics"])
    assert info["tags"].get("dataset_md5") and info["tags"].get("git_commit")
    assert {"validation", "evaluation"} <= set(info["artifacts"])
