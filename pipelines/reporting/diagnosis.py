"""The evaluate stage's diagnosis (:mod:`detr.diagnosis`): why the model is weak and which
setting to turn, from the measurement and the train stage's curves.

Reads ``plots_dir/train_loss.csv`` (``epoch,loss,...``) and ``plots_dir/val_ap.csv``
(``step,epoch,AP,...``) where the train stage wrote them; writes
``report_dir/diagnosis.json``: ``{"verdicts": [str], "findings": [{"name", "summary", "weak",
"verdict", "values"}], "metrics": {"diag_<name>": float}}``; prints the findings.
"""

from __future__ import annotations

import json
from pathlib import Path

from detr.config import DataConfig
from detr.diagnosis import Diagnosis, diagnose
from detr.evaluation import CocoEvaluation
from pipelines.measurement import Measurement
from pipelines.reporting.plots import read_loss, read_val_curve

FILE = "diagnosis.json"


def run_diagnosis(measured: Measurement, evaluation: CocoEvaluation, *, data_cfg: DataConfig,
                  score_threshold: float, plots_dir: Path, report_dir: Path,
                  nms: float | None = None) -> Diagnosis:
    """Diagnose ``measured`` (taken with ``layers=True``), write ``report_dir/diagnosis.json``
    and print every finding, verdicts first. Sizes follow the checkpoint's ``data`` params
    (the scale it was trained and validated at), ``data_cfg`` where it has none."""
    params = dict(measured.params or {})
    params["data"] = _val_resize(params.get("data") or {}, data_cfg)
    loss = read_loss(plots_dir / "train_loss.csv")
    diagnosis = diagnose(
        measured.val.coco, measured.predictions, params=params,
        stride=measured.model.feature_stride, ap=evaluation.stats["AP"],
        layer_predictions=measured.layer_predictions, losses=loss[1]["loss"] if loss else (),
        val_curve=read_val_curve(plots_dir / "val_ap.csv"), score_threshold=score_threshold,
        nms=nms, raw_predictions=measured.raw_predictions, tile=measured.tile_size)
    path = report_dir / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(diagnosis.to_dict(), indent=2) + "\n")
    print(format_diagnosis(diagnosis))
    return diagnosis


def _val_resize(trained: dict, data_cfg: DataConfig) -> dict:
    """The checkpoint's ``data`` section where its ``scales`` and ``max_size`` are numbers,
    else (none, or a rule not resolved to numbers) with those of ``data_cfg``."""
    scales, max_size = trained.get("scales"), trained.get("max_size")
    if (isinstance(scales, list | tuple) and scales and isinstance(max_size, int | float)
            and all(isinstance(s, int | float) for s in scales)):
        return dict(trained)
    return {**trained, "scales": list(data_cfg.scales), "max_size": data_cfg.max_size}


def format_diagnosis(diagnosis: Diagnosis) -> str:
    """The findings as text: the verdicts (or that there is none), then every summary."""
    verdicts = diagnosis.verdicts()
    lines = ["Diagnosis:"] + ([f"  {v}" for v in verdicts] or ["  no weakness found"])
    lines += ["Measured:"] + [f"  {f.name}: {f.summary}" for f in diagnosis.findings]
    return "\n".join(lines)
