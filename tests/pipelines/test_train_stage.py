"""The train stage's MLflow logger and DVC plot files (no training, no server)."""

from __future__ import annotations

import csv

from detr.evaluation import STAT_NAMES
from pipelines.stages import train as stage


class _Client:
    def __init__(self):
        self.batches = []

    def log_batch(self, run_id, metrics=()):
        self.batches.append([(m.key, m.value, m.step) for m in metrics])


def _logger() -> stage.MlflowLogger:
    logger = object.__new__(stage.MlflowLogger)  # no MLflow client, no tracking server
    logger.client, logger.run_id, logger.pending = _Client(), "run", []
    return logger


def test_one_round_trip_per_call_and_epoch_rows_without_the_val_copy():
    logger = _logger()
    logger({"step": 50, "epoch": 0, "loss": 2.0, "lr": 1e-3})
    logger({"step": 50, "epoch": 0, "val_AP": 0.3})
    logger({"epoch": 0, "epoch_loss": 2.5, "val_AP": 0.3})
    assert logger.client.batches == [[("loss", 2.0, 50), ("lr", 1e-3, 50)],
                                     [("val_AP", 0.3, 50)], [("epoch_loss", 2.5, 0)]]


def test_val_curve_csv_has_a_row_per_evaluation_and_a_header_without_any(tmp_path):
    path = tmp_path / "plots" / "val_ap.csv"
    stage._write_val_curve(path, [])
    assert path.read_text().strip() == ",".join(["step", "epoch", *STAT_NAMES])
    curve = [{"step": s, "epoch": s // 10, **dict.fromkeys(STAT_NAMES, s / 100)} for s in (5, 10)]
    stage._write_val_curve(path, curve)
    rows = list(csv.DictReader(path.open()))
    assert [(r["step"], r["AP"]) for r in rows] == [("5", "0.05"), ("10", "0.1")]
