"""``python -m pipelines summary``: what the last pipeline run produced, and where to look."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import server_state, tracking
from pipelines.params import project_root

TABLE = Path("reports/evaluation/coco_table.txt")
MASK_TABLE = Path("reports/evaluation/mask_table.txt")  # pipelines.reporting.segmentation
PANOPTIC_TABLE = Path("reports/evaluation/panoptic_table.txt")
DIAGNOSIS = Path("reports/evaluation/diagnosis.json")  # pipelines.reporting.diagnosis
REGISTER = Path("reports/register.json")


def main(argv: list[str] | None = None) -> int:
    if TABLE.is_file():
        print("\nCOCO evaluation on the val split (pycocotools):")
        print(TABLE.read_text().rstrip())
    for path, title in ((MASK_TABLE, "Mask AP / AR (COCOeval segm)"),
                        (PANOPTIC_TABLE, "Panoptic quality (%)")):
        if path.is_file():  # only a segmentation model's evaluation writes them
            print(f"\n{title}:")
            print(path.read_text().rstrip())
    if DIAGNOSIS.is_file():
        verdicts = json.loads(DIAGNOSIS.read_text()).get("verdicts", [])
        print("\nDiagnosis (reports/evaluation/report.html explains it):")
        print("\n".join(f"  {v}" for v in verdicts) or "  no weakness found")
    if REGISTER.is_file():
        reg = json.loads(REGISTER.read_text())
        print(f"\nRegistered {reg['model_uri']} ({reg['metric']} {reg['value']:.3f}) as "
              f"@{reg['decision']}; champion before: "
              f"{reg.get('champion_version_before') or 'none'}")
        print(f"  load it: mlflow.pyfunc.load_model('{reg['alias_uri']}')")
    print(f"\nMLflow runs and registry: {tracking.tracking_uri()}")
    mlflow_ui = server_state.live_url("mlflow", project_root())
    prefect_api = server_state.live_url("prefect", project_root())
    if mlflow_ui and prefect_api:  # `make serve` is up: the stages used it
        print(f"  UI:       {mlflow_ui} (MLflow), {prefect_api.removesuffix('/api')} (Prefect: "
              "each stage is a flow run)")
    else:
        print("  UI:       make serve       -> MLflow http://127.0.0.1:5000, Prefect "
              "http://127.0.0.1:4200 (the next `make run` then shows each stage as a flow run)")
    print("  DVC:      .venv/bin/dvc metrics show | dvc plots show | dvc exp run -S train.epochs=20")
    return 0
