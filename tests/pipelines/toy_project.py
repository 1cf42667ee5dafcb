"""A small DVC project with stand-in stages (no torch, seconds) for the retrain flow's tests.

The stand-in stages write the same files as the real ones (the reports the flow reads
included). The toy ``register`` stage writes ``reports/register.json``, updated with
``toy_outcome.json`` when a test wrote one (what the registration should have found).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from pipelines.ops import retrain

BIN = Path(sys.executable).parent
STAGES = ["prepare", "validate", "train", "evaluate", "register"]

# The stand-in stages: same files as the real ones (the reports the flow reads included).
TOY = '''
import json, sys
from pathlib import Path
import yaml

params = yaml.safe_load(open("params.yaml"))
stage = sys.argv[1]

def write(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(data if isinstance(data, str) else json.dumps(data))

if stage == "prepare":
    files = sorted(p.name for p in Path("data/raw").iterdir())
    write("data/dataset/files.json", files)
    print(f"toy prepare: {len(files)} files")
elif stage == "validate":
    ok = params["validate"]["max_boxes_per_image"] >= 2
    write("reports/validation/validation.json", {
        "success": ok, "data_docs": "reports/validation/data_docs/index.html",
        "expectations": [
            {"name": "ids_unique", "table": "images", "expectation": "expect_unique",
             "success": True, "element_count": 3, "unexpected_count": 0, "examples": []},
            {"name": "boxes_per_image_in_bounds", "table": "images",
             "expectation": "expect_column_values_to_be_between", "success": ok,
             "element_count": 3, "unexpected_count": 0 if ok else 2,
             "examples": [] if ok else [{"split": "train", "id": 7, "num_boxes": 3}]}]})
    print("toy validate:", "passed" if ok else "FAILED")
    sys.exit(0 if ok else 1)
elif stage == "train":
    epochs = params["train"]["epochs"]
    write("checkpoints/model.txt", f"epochs={epochs} " + open("data/dataset/files.json").read())
    with open("train_runs.log", "a") as log:  # not a DVC output: counts real runs
        log.write(f"{epochs}\\n")
    print(f"toy train: {epochs} epochs")
elif stage == "evaluate":
    names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
             "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large"]
    write("metrics/coco.json", {n: 0.25 for n in names})
    write("reports/evaluation/coco_table.txt", "\\n".join(f" {n} = 0.250" for n in names))
    print("toy evaluate: AP 0.250")
elif stage == "register":
    registry = Path("registry.json")
    versions = json.loads(registry.read_text()) if registry.exists() else []
    versions.append(len(versions) + 1)
    registry.write_text(json.dumps(versions))
    write("reports/register.json", {
        "model_name": "toy", "version": versions[-1],
        "decision": "champion" if len(versions) == 1 else "challenger", "metric": "AP",
        "value": 0.25, "champion_version_before": None, "champion_value_before": None,
        "model_uri": f"models:/toy/{versions[-1]}", "alias_uri": "models:/toy@champion",
        "run_id": "r", "tracking_uri": "sqlite:///toy.db",
        # what a test wants this registration to have found (not a DVC dependency)
        **(json.loads(Path("toy_outcome.json").read_text())
           if Path("toy_outcome.json").exists() else {})})
    print(f"toy register: version {versions[-1]}")
'''

# Listed out of order on purpose: the flow runs them in dependency order.
DVC_YAML = '''
stages:
  evaluate:
    cmd: python toy.py evaluate
    deps: [checkpoints, toy.py]
    metrics: [{metrics/coco.json: {cache: false}}]
    outs: [{reports/evaluation: {cache: false}}]
  register:
    cmd: python toy.py register
    deps: [checkpoints, metrics/coco.json]
    outs: [{reports/register.json: {cache: false}}]
  prepare:
    cmd: python toy.py prepare
    deps: [data/raw, toy.py]
    outs: [data/dataset]
  train:
    cmd: python toy.py train
    deps: [data/dataset, reports/validation]
    params: [train.epochs]
    outs: [checkpoints]
  validate:
    cmd: python toy.py validate
    deps: [data/dataset]
    params: [validate.max_boxes_per_image]
    outs: [{reports/validation: {cache: false}}]
'''

PARAMS = {"prepare": {"source": "data/raw"}, "validate": {"max_boxes_per_image": 100},
          "train": {"epochs": 2}, "schedule": {"lock_wait_s": 0, "push": True}}


def sh(cmd: list[str], cwd: Path) -> str:
    """Run ``cmd`` in ``cwd`` as the flow runs stages; fail the test if it fails."""
    env = {**retrain.stage_environment(), "DVC_NO_ANALYTICS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "DVC_ROOT"))}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout



def make_toy(source: Path, root: Path) -> tuple[Path, Path]:
    """A DVC project in ``root`` whose raw data is the folder ``source`` (one file written),
    imported with `dvc import-url`. Returns (root, source)."""
    (source / "a.jpg").write_text("a")
    (root / "toy.py").write_text(textwrap.dedent(TOY))
    (root / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (root / "data").mkdir()
    sh([str(BIN / "dvc"), "init", "--no-scm", "-q"], root)
    sh([str(BIN / "dvc"), "import-url", str(source), "data/raw"], root)
    return root, source
