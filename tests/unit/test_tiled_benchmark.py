"""benchmarks/tiled_prediction.py runs end to end in its tiny configuration."""

from __future__ import annotations

import json

import pytest

from benchmarks import tiled_prediction


@pytest.mark.slow
def test_tiny_run_reports_every_measurement(tmp_path):
    out = tmp_path / "rows.json"
    rows = tiled_prediction.main(["--tiny", "--device", "cpu", "--workers", "1",
                                  "--work", str(tmp_path / "work"), "--json", str(out)])
    names = [r["name"] for r in rows]
    assert names[0] == "val tiles (as trained)" and len(names) == 6
    assert rows[0]["images"] > rows[1]["images"] == tiled_prediction.TINY["num_val"]
    assert all(-1 <= r["AP"] <= 1 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
