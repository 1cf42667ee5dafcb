"""The ``validate`` stage: the Great Expectations suite over the canonical dataset.

Reads ``<dataset>/annotations/{train,val}.json`` and ``<dataset>/images/{train,val}/``
(:mod:`detr.data.formats`); writes

- ``<report_dir>/validation.json``: success, counts, params and every expectation with
  pass/fail, counts and up to ``max_examples`` offending records (split + ids / file name);
- ``<report_dir>/data_docs/index.html``: Great Expectations Data Docs of the same run;
- ``<report_dir>/dataset.json``: :func:`dataset_statistics` (a report, not a ``dvc metrics``
  file: its ~40 numbers would crowd ``dvc exp show``), logged to MLflow by the train stage.

``run`` is pure (files in, files out, a report back); ``validate_flow`` wraps it for Prefect and
fails when the dataset fails; ``main`` is the command line (``python -m pipelines validate``):
exit 0 when every expectation passes, 1 when some fail (a summary naming them and example
records goes to stderr), 2 when the dataset layout or the params are unusable.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from detr.data.layout import SPLITS
from pipelines.params import ValidateConfig
from pipelines.validation.dataset_tables import DatasetLayoutError, DatasetTables, load_tables
from pipelines.validation.expectations import ExpectationOutcome, run_suites

# COCO's area ranges (px^2): small < 32^2 <= medium < 96^2 <= large.
AREA_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2),
               "large": (96.0**2, float("inf"))}
STATISTICS_FILE = "dataset.json"  # in the report folder, beside validation.json


class DatasetValidationError(RuntimeError):
    """The dataset failed validation; the message names the failed expectations."""


@dataclass(frozen=True)
class ValidationReport:
    """What ``run`` found and wrote. ``statistics``: see :func:`dataset_statistics` (also
    written to ``report_path.parent / STATISTICS_FILE``)."""

    success: bool
    outcomes: tuple[ExpectationOutcome, ...]
    statistics: dict[str, Any]
    report_path: Path
    docs_index: Path

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def summary(self, max_examples: int = 3) -> str:
        """A few lines: passed/failed counts, then each failed expectation with examples."""
        lines = [f"{len(self.outcomes) - len(self.failed)}/{len(self.outcomes)} expectations passed"
                 f" (report: {self.report_path})"]
        for o in self.failed:
            lines.append(f"FAILED {o.table}.{o.name} ({o.expectation}): {_count(o)}")
            lines += [f"    {_record(e)}" for e in o.examples[:max_examples]]
            if o.fix:
                lines.append(f"    to pass: {o.fix}")
            if o.error:
                lines.append(f"    {o.error}")
        return "\n".join(lines)


def run(dataset_dir: str | Path, params: ValidateConfig,
        report_dir: str | Path) -> ValidationReport:
    """Validate ``dataset_dir``; write the JSON report, Data Docs and dataset statistics.

    Does not raise on failed expectations: see ``ValidationReport.success``.

    Raises:
        DatasetLayoutError: an annotation file is missing or not a COCO json object.
    """
    report_dir = Path(report_dir).resolve()  # GE's Data Docs site needs an absolute path
    tables = load_tables(dataset_dir, workers=params.workers, masks=params.masks)
    docs_dir = report_dir / "data_docs"
    if (docs_dir / "index.html").is_file():  # our previous site: drop its stale pages
        shutil.rmtree(docs_dir)
    outcomes = tuple(run_suites(tables, params, docs_dir=docs_dir))
    statistics = dataset_statistics(tables)
    report = ValidationReport(
        success=all(o.success for o in outcomes),
        outcomes=outcomes,
        statistics=statistics,
        report_path=report_dir / "validation.json",
        docs_index=docs_dir / "index.html",
    )
    _write_json(report.report_path, _report_dict(report, dataset_dir, params, tables))
    _write_json(report_dir / STATISTICS_FILE, statistics)
    return report


def dataset_statistics(tables: DatasetTables) -> dict[str, Any]:
    """Per split: images, boxes, crowd boxes, boxes per image (mean, max), boxes per COCO area
    range (small/medium/large by ``area``) and per category name. Plain numbers in nested
    dicts, as ``mlflow.log_metrics`` (after flattening) wants them."""
    names = tables.categories.drop_duplicates("id").set_index("id")["name"]
    stats: dict[str, Any] = {"categories": int(tables.categories["id"].nunique())}
    for split in SPLITS:
        images = tables.images[tables.images["split"] == split]
        boxes = tables.annotations[tables.annotations["split"] == split]
        per_image = images["num_boxes"]
        area = boxes["area"]
        per_class = boxes["category_id"].map(names).fillna("<unknown>").value_counts()
        stats[split] = {
            "images": len(images),
            "boxes": len(boxes),
            "crowd_boxes": int((boxes["iscrowd"] == 1).sum()),
            "boxes_per_image_mean": round(float(per_image.mean()), 4) if len(images) else 0.0,
            "boxes_per_image_max": int(per_image.max()) if len(images) else 0,
            "area": {k: int(area.between(lo, hi, inclusive="left").sum())
                     for k, (lo, hi) in AREA_RANGES.items()},
            "per_class": dict(sorted((str(k), int(v)) for k, v in per_class.items())),
        }
    return stats


def _report_dict(report: ValidationReport, dataset_dir, params: ValidateConfig,
                 tables: DatasetTables) -> dict[str, Any]:
    failed = report.failed
    return {
        "success": report.success,
        "dataset": str(dataset_dir),
        "counts": {
            "expectations": len(report.outcomes),
            "passed": len(report.outcomes) - len(failed),
            "failed": len(failed),
            "rows": {t: len(getattr(tables, t)) for t in ("images", "annotations", "categories")},
        },
        "failed": [o.name for o in failed],
        "params": asdict(params),
        "data_docs": str(report.docs_index),
        "expectations": [asdict(o) for o in report.outcomes],
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _record(example: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in example.items())


def _count(outcome: ExpectationOutcome) -> str:
    if outcome.error:
        return "error"
    if outcome.unexpected_count is None:  # aggregate expectation
        return f"observed {outcome.observed!r}"
    return f"{outcome.unexpected_count}/{outcome.element_count} records"


@flow(name="validate", log_prints=True)
def validate_flow(**kwargs: Any) -> dict[str, Any]:
    """Prefect flow over :func:`run`: fails (with the summary as its message) when an
    expectation fails; returns the dataset statistics."""
    report = run(**kwargs)
    if not report.success:
        raise DatasetValidationError(report.summary())
    return report.statistics


def main(argv: list[str] | None = None) -> int:
    """Command line: validate a dataset; the exit code says how it went (module docstring)."""
    from pipelines import stage
    from pipelines.params import load

    parser = argparse.ArgumentParser(prog="python -m pipelines validate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/dataset", help="canonical dataset folder")
    parser.add_argument("--params", default="params.yaml", help="params.yaml")
    parser.add_argument("--reports", default="reports/validation",
                        help="folder for validation.json, dataset.json (statistics), data_docs/")
    args = parser.parse_args(argv)
    kwargs = {"dataset_dir": args.data, "params": load(args.params)["validate"],
              "report_dir": args.reports}
    try:
        result = stage.invoke(validate_flow, run, **kwargs)
    except DatasetLayoutError as exc:
        print(f"validate: {exc}", file=sys.stderr)
        return 2
    except DatasetValidationError as exc:
        print(f"validate: the dataset failed validation\n{exc}", file=sys.stderr)
        return 1
    if isinstance(result, ValidationReport):  # run() without Prefect
        print(result.summary(), file=sys.stdout if result.success else sys.stderr)
        return 0 if result.success else 1
    print("validate: every expectation passed")
    return 0
