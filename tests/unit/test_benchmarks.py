"""benchmarks/train_loop.py runs our whole training loop on the CPU (tiny preset) and reports
its rows; the official rows need a checkout of facebookresearch/detr and are skipped here."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import _loop_metrics as metrics
from benchmarks import train_loop


@pytest.mark.slow
def test_tiny_whole_loop_on_cpu(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = train_loop.main(["--device", "cpu", "--preset", "tiny", "--steps", "2", "--warmup",
                            "1", "--data", str(tmp_path / "data"), "--json", str(out)])
    assert [r["name"] for r in rows] == ["ours fp32"]
    row = rows[0]
    assert row["img_s"] > 0 and row["step_ms"] > 0 and row["gflops_per_image"] > 0
    assert row["mfu_pct"] is None and row["gpu_util_pct"] is None  # GPU-only numbers
    assert row["syncs"] is None
    assert json.loads(out.read_text())["rows"][0]["img_s"] == row["img_s"]
    assert "ours fp32" in capsys.readouterr().out
    # the dataset is reused on a second run, not regenerated
    stamp = (tmp_path / "data" / "annotations" / "train.json").stat().st_mtime_ns
    train_loop.dataset(tmp_path / "data", train_loop.PRESETS["tiny"], 1)
    assert (tmp_path / "data" / "annotations" / "train.json").stat().st_mtime_ns == stamp


def test_a_real_dataset_is_never_overwritten(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text('{"images": [], "categories": []}')
    with pytest.raises(FileExistsError, match="not the synthetic demo"):
        train_loop.dataset(tmp_path, train_loop.PRESETS["tiny"], 1)


def test_step_clock_times_the_window_after_warmup():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    seen = []
    clock = metrics.StepClock(opt, torch.device("cpu"), warmup=2, steps=3,
                              on_start=lambda: seen.append(("start", clock.count)),
                              on_stop=lambda: seen.append(("stop", clock.count)))
    for _ in range(7):
        opt.step()
    assert clock.close() >= 0 and len(clock.times) == 2
    assert seen == [("start", 2), ("stop", 5)]
    short = metrics.StepClock(opt, torch.device("cpu"), warmup=2, steps=3)
    opt.step()
    with pytest.raises(RuntimeError, match="fewer than warmup 2 \\+ steps 3"):
        short.close()


def test_flops_and_peak_table():
    layer = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(2, 8, requires_grad=True)
    assert metrics.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 2 * 8 * 4
    assert metrics.peak_tflops(torch.device("cpu"), "bf16", None) is None
    assert metrics.peak_tflops(torch.device("cpu"), "bf16", 100.0) == 100.0


@pytest.mark.slow
def test_pipeline_time_runs_the_compute_stages_on_cpu(tmp_path):
    from benchmarks import pipeline_time

    root = Path(__file__).resolve().parents[2]
    out = pipeline_time.main(["--params", str(root / "params.yaml"), "--epochs", "1",
                              "--num-train", "8", "--num-val", "4", "--workers", "1",
                              "--json", str(tmp_path / "p.json")])
    assert set(out["seconds"]) == {"prepare", "train", "evaluate"}
    assert out["steps"] == 1 and out["train_img_s"] > 0
    assert out["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert json.loads((tmp_path / "p.json").read_text())["steps"] == 1
