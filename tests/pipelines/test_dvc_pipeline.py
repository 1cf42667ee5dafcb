"""End to end: `dvc repro` in a temporary copy of the project (git init + commit), tiny params."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipelines.project import BIN, STAGES, make_project, project_env
from tests.pipelines.project import ran_stages as _ran
from tests.pipelines.project import sh as _sh


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git + DVC project copied from this checkout, params made tiny, committed."""
    root = tmp_path_factory.mktemp("project")
    env = project_env()
    make_project(root, env)
    return root, env


@pytest.mark.slow
def test_dvc_repro_end_to_end(project):
    root, env = project
    dvc = str(BIN / "dvc")
    first = _sh([dvc, "repro"], root, env)
    assert _ran(first.stdout) == set(STAGES), first.stdout
    for path in ("data/dataset/annotations/train.json", "reports/validation/validation.json",
                 "reports/validation/dataset.json",
                 "checkpoints/checkpoint.pth", "checkpoints/best.pth", "metrics/coco.json",
                 "plots/train_loss.csv", "plots/val_ap.csv", "reports/settings.json", "reports/evaluation/coco_table.txt", "reports/register.json"):
        assert (root / path).exists(), path
    settings = {s["key"]: s for s in
                json.loads((root / "reports/settings.json").read_text())["settings"]}
    assert settings["model.num_queries"]["source"] == "rule"  # auto in params.yaml
    assert settings["model.num_queries"]["value"] >= 5  # the demo has up to 3 boxes an image
    assert settings["train.epochs"]["source"] == "explicit"  # set by the tiny params
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
        " 'tags': run.data.tags, 'queries': run.data.params['model.num_queries'],"
        " 'artifacts': [a.path for a in c.list_artifacts(run.info.run_id)]}))\n"
    )
    out = _sh([sys.executable, "-c", script], root, {**env, "DVC_ROOT": str(root)}).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["versions"] == 2 and str(info["champion"]) == "1"  # int from SQLite
    assert {"AP", "AP50", "AR_100", "loss", "loss_giou", "lr"} <= set(info["metrics"])
    assert info["params"] > 40
    resolved = json.loads((root / "reports/settings.json").read_text())["settings"]
    assert info["queries"] == str(next(s["value"] for s in resolved
                                       if s["key"] == "model.num_queries"))  # not "auto"
    assert {"dataset.train.images", "dataset.val.boxes"} <= set(info["metrics"])
    assert info["tags"].get("dataset_md5") and info["tags"].get("git_commit")
    assert {"validation", "evaluation", "settings.json"} <= set(info["artifacts"])
