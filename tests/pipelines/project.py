"""A throwaway copy of this project for end-to-end tests: git + DVC, tiny params.

Shared by the tests that run the real pipeline (``dvc repro``), the servers and the fault
injections, so that they all build the copy, its params and its environment the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ("prepare", "validate", "train", "evaluate", "register")

TINY_PARAMS = {
    "prepare": {"demo": {"num_train": 16, "num_val": 4, "image_size": 64, "max_objects": 3}},
    "validate": {"workers": 1},
    "model": {"backbone": "resnet18", "norm": "bn", "freeze_stem": False, "hidden_dim": 32,
              "nheads": 2, "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 64,
              "dropout": 0.0, "aids": {"query_groups": {"groups": 2}}},  # num_queries: auto
    "data": {"scales": [64], "max_size": 64, "crop_scales": [64], "crop_size": [48, 64],
             "num_workers": 0},
    "train": {"epochs": 1, "batch_size": 4, "lr": 1.0e-3, "lr_backbone": 1.0e-3,
              "warmup_steps": 0, "precision": "fp32", "channels_last": False, "device": "cpu",
              "log_every": 1},  # every step reaches MLflow: the fault tests wait for a step
    "evaluate": {"batch_size": 4, "num_examples": 2},
    # A second version can't beat the first by 0.5 AP: it must become @challenger. One epoch
    # of a tiny model scores under the default floor (min_ap 0.02): no floor here.
    "register": {"model_name": "detr-e2e", "min_improvement": 0.5, "min_ap": 0.0},
}


def project_files() -> list[str]:
    """What a clone of this checkout would hold (tracked and not-ignored files)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in listed.splitlines() if (ROOT / f).is_file()]


def sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``cmd``; fail the test with the tail of its output if it exits non-zero."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def ran_stages(dvc_output: str) -> set[str]:
    """The stages ``dvc repro`` says it ran."""
    return {s for s in STAGES if f"Running stage '{s}'" in dvc_output}


def update_params(path: Path, overrides: dict) -> None:
    """Merge ``overrides`` (section -> key -> value; nested dicts merged) into a params file."""
    params = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def project_env(drop: tuple[str, ...] = ("MLFLOW_", "PREFECT_API", "DVC_"), **extra: str) -> dict:
    """This environment without settings that would point the copy elsewhere, this venv's
    bin/ first on PATH, and a git identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PATH=f"{BIN}:{env['PATH']}", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="2",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", **extra)
    return env


def make_project(root: Path, env: dict, params: dict = TINY_PARAMS) -> None:
    """Copy the project into ``root``, apply ``params``, and commit it to a new git repo."""
    for rel in project_files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, root / rel)
    update_params(root / "params.yaml", params)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        sh(cmd, root, env)


def use_own_data(root: Path, source: str = "data/raw", **prepare: object) -> None:
    """Point the copy's ``prepare`` at ``source`` as the README's "Bring your own data" says:
    ``prepare.source`` (and the other ``prepare`` keys given) in params.yaml, ``source`` under
    the stage's ``deps:`` in dvc.yaml."""
    update_params(root / "params.yaml", {"prepare": {"source": source, **prepare}})
    dvc_yaml = root / "dvc.yaml"
    marker = "      # Your own data: add its folder here"
    text = dvc_yaml.read_text()
    if marker not in text:
        raise ValueError(f"{dvc_yaml}: no line {marker.strip()!r} to put {source} under")
    dvc_yaml.write_text(text.replace(marker, f"      - {source}\n{marker}", 1))


def real_disk(paths: list[Path]) -> list[int]:
    """Bytes of disk blocks under each path (files, folders, links), like ``du -s --block-size=1
    a b c``: a hard-linked file counts once, under the first path that holds it."""
    seen: set[tuple[int, int]] = set()
    sizes = []
    for top in paths:
        total = 0
        for folder, dirs, files in os.walk(top):
            for name in [".", *dirs, *files]:
                st = os.lstat(os.path.join(folder, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
        sizes.append(total)
    return sizes


@contextmanager
def local_registry(root: Path) -> Iterator[str]:
    """``root`` as the project of an in-process pipeline run: the working directory and
    ``DVC_ROOT``, MLflow on its own SQLite store and artifacts (no server, no Prefect), the
    experiment created and a run started (``reports/mlflow_run.json``). Yields the run id."""
    import mlflow
    import pytest

    from pipelines import tracking

    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
            mp.delenv(var, raising=False)
        mp.setenv("DVC_ROOT", str(root))
        mp.chdir(root)
        tracking.configure()
        mlflow.create_experiment(tracking.EXPERIMENT,
                                 artifact_location=(root / "mlartifacts").as_uri())
        yield tracking.start_run()

