"""``python -m pipelines summary``: what the last pipeline run produced, and where to look."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import tracking

TABLE = Path("reports/evaluation/coco_table.txt")
REGISTER = Path("reports/register.json")


def main(argv: list[str] | None = None) -> int:
    if TABLE.is_file():
        print("\nCOCO evaluation on the val split (pycocotools):")
        print(TABLE.read_text().rstrip())
    if REGISTER.is_file():
        reg = json.loads(REGISTER.read_text())
        print(f"\nRegistered {reg['model_uri']} ({reg['metric']} {reg['value']:.3f}) as "
              f"@{reg['decision']}; champion before: "
              f"{reg.get('champion_version_before') or 'none'}")
        print(f"  load it: mlflow.pyfunc.load_model('{reg['alias_uri']}')")
    print(f"\nMLflow runs and registry: {tracking.tracking_uri()}")
    print("  UI:       make mlflow-ui   -> http://127.0.0.1:5000")
    print("  Prefect:  make prefect-ui  -> http://127.0.0.1:4200 (then run with "
          "PREFECT_API_URL=http://127.0.0.1:4200/api to see each stage there)")
    print("  DVC:      .venv/bin/dvc metrics show | dvc plots show | dvc exp run -S train.epochs=20")
    return 0
