"""torchrun with 2 gloo processes on the CPU matches one process with the same global batch."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import yaml

from detr.checkpoint import load_file
from detr.config import to_dict
from tests.conftest import tiny_training


def _params(path, batch_size):
    model, loss, data, train = tiny_training(epochs=2, batch_size=batch_size)
    # Deterministic inputs (no augmentation) and no batch statistics (frozen BN), so that the
    # only difference between the runs is how the batch is split across processes.
    model = dataclasses.replace(model, norm="frozen_bn", freeze_stem=True)
    data = dataclasses.replace(data, hflip=False, crop_scales=None)
    path.write_text(yaml.safe_dump({"model": to_dict(model), "loss": to_dict(loss),
                                    "data": to_dict(data), "train": to_dict(train)}))
    return path


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tiny_dataset, tmp_path):
    single = tmp_path / "single"
    ddp = tmp_path / "ddp"
    _run([sys.executable, "-m", "detr.train", "--params", str(_params(tmp_path / "p2.yaml", 4)),
          "--data", str(tiny_dataset), "--out", str(single)], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", "29517", "-m", "detr.train"]
    out = _run(torchrun + ["--params", str(_params(tmp_path / "p1.yaml", 2)),
                           "--data", str(tiny_dataset), "--out", str(ddp)], tmp_path)
    assert "Average Precision" in out.stdout  # rank 0 prints the COCO table
    a, b = load_file(single / "checkpoint.pth"), load_file(ddp / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], atol=1e-5, rtol=1e-4), key
    steps = [h["epoch_loss"] for h in a["history"]], [h["epoch_loss"] for h in b["history"]]
    assert steps[0] == pytest.approx(steps[1], rel=1e-4)
