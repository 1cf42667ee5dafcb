"""The evaluate stage's mask AP and panoptic quality: measured, written, tabled.

Input: the val detections by image id (``detr.engine.evaluate`` / the predictor's contract)
and the val split's canonical json. An image's detections carry ``masks`` (bool [N, H, W] at
the original size, or their RLEs, :func:`detr.segm_evaluation.encode_masks`) for mask AP, and
``panoptic`` (``{"segments": int [H, W], "segments_info": [...]}``) for PQ. Predictions with
neither (a detection model) give neither number; nothing here is then computed.

Files (:func:`write_segmentation`):

- ``metrics_dir/segm.json`` (DVC metrics): ``{mask_AP: float, ...}``, the 12
  ``detr.segm_evaluation.MASK_STAT_NAMES`` (-1.0 undefined); ``{}`` when no masks were
  predicted (a detection run: nothing measured, nothing claimed);
- ``metrics_dir/panoptic.json`` (DVC metrics): ``PQ, SQ, RQ`` and their ``_th`` / ``_st``
  (``detr.panoptic_quality.STAT_NAMES``, -1.0 undefined, fractions in [0, 1]); ``{}``
  without panoptic predictions;
- ``report_dir/mask_table.txt``: pycocotools' 12-line summary of the masks;
  ``report_dir/per_class_mask_ap.json``: ``{class: mask AP or null}``;
- ``report_dir/panoptic_table.txt``: all / things / stuff and per class, in %;
  ``report_dir/per_class_pq.json``: ``{class: {"PQ", "SQ", "RQ", "TP", "FP", "FN"} or null}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pycocotools.coco import COCO

from detr.evaluation import CocoEvaluation, load_ground_truth
from detr.panoptic_quality import PanopticQuality, evaluate_panoptic, format_panoptic
from detr.segm_evaluation import evaluate_masks

SEGM_FILE = "segm.json"
PANOPTIC_FILE = "panoptic.json"
MASK_TABLE = "mask_table.txt"
PANOPTIC_TABLE = "panoptic_table.txt"
MASK_PER_CLASS = "per_class_mask_ap.json"
PANOPTIC_PER_CLASS = "per_class_pq.json"
_METRIC_UNSAFE = re.compile(r"[^\w.\- ]")  # what MLflow refuses in metric names (and / :)
_COLUMNS = ("PQ", "SQ", "RQ", "TP", "FP", "FN")


@dataclass(frozen=True)
class SegmentationResults:
    """``masks``: mask AP (None: no masks predicted); ``panoptic``: PQ (None: no panoptic
    maps predicted)."""

    masks: CocoEvaluation | None = None
    panoptic: PanopticQuality | None = None

    def __bool__(self) -> bool:
        return self.masks is not None or self.panoptic is not None


def evaluate_segmentation(predictions: Mapping[int, Mapping[str, object]],
                          coco_gt: COCO | str | Path) -> SegmentationResults:
    """Mask AP when any image's detections carry ``masks``, PQ when any carries ``panoptic``
    (images without are scored as predicting nothing). ``coco_gt``: the val json (path or
    ``COCO``), its annotations with ``segmentation``.

    Raises:
        ValueError: malformed predictions or ground truth (the message names the image).
    """
    with_masks = any("masks" in d for d in predictions.values())
    with_panoptic = any("panoptic" in d for d in predictions.values())
    if not (with_masks or with_panoptic):
        return SegmentationResults()
    gt = load_ground_truth(coco_gt)
    masks = evaluate_masks(gt, {i: d for i, d in predictions.items() if "masks" in d}
                           ) if with_masks else None
    panoptic = evaluate_panoptic(gt, {i: d["panoptic"] for i, d in predictions.items()
                                      if "panoptic" in d}) if with_panoptic else None
    return SegmentationResults(masks, panoptic)


def write_segmentation(results: SegmentationResults, labels: Mapping[int, str], *,
                       metrics_dir: Path = Path("metrics"),
                       report_dir: Path = Path("reports/evaluation")) -> None:
    """The files of the module doc (both metrics files always, ``{}`` for what was not
    measured; report files of an earlier evaluation that this one did not measure are
    removed). ``labels``: display name by category id (``pipelines.measurement.class_labels``).
    """
    masks, panoptic = results.masks, results.panoptic
    _write_json(Path(metrics_dir) / SEGM_FILE, {} if masks is None else masks.stats)
    _write_json(Path(metrics_dir) / PANOPTIC_FILE, {} if panoptic is None else panoptic.stats)
    report_dir = Path(report_dir)
    for name in (MASK_TABLE, MASK_PER_CLASS, PANOPTIC_TABLE, PANOPTIC_PER_CLASS):
        (report_dir / name).unlink(missing_ok=True)  # an earlier evaluation's
    if masks is not None:
        _write_text(report_dir / MASK_TABLE, masks.table + "\n")
        _write_json(report_dir / MASK_PER_CLASS,
                    {labels[c]: ap for c, ap in masks.per_class_ap.items()})
    if panoptic is not None:
        _write_text(report_dir / PANOPTIC_TABLE, format_panoptic(panoptic) + "\n")
        _write_json(report_dir / PANOPTIC_PER_CLASS,
                    {labels[c]: v for c, v in panoptic.per_class.items()})


def segmentation_text(results: SegmentationResults) -> str:
    """The mask table and the PQ table as printed by the stage ('' when neither)."""
    parts = []
    if results.masks is not None:
        parts += ["Mask AP / AR (COCOeval segm):", results.masks.table]
    if results.panoptic is not None:
        parts += ["Panoptic quality (%):", format_panoptic(results.panoptic)]
    return "\n".join(parts)


def segmentation_stats(results: SegmentationResults) -> dict[str, float]:
    """Every ``mask_*`` and PQ statistic measured (-1.0 undefined), as ``metrics/segm.json``
    and ``metrics/panoptic.json`` hold them; empty for a box model."""
    return {**(results.masks.stats if results.masks is not None else {}),
            **(results.panoptic.stats if results.panoptic is not None else {})}


def segmentation_metrics(results: SegmentationResults,
                         labels: Mapping[int, str]) -> dict[str, float]:
    """MLflow metrics: the defined (not -1) ``mask_*`` and PQ statistics,
    ``mask_AP_class_<class>`` and ``PQ_class_<class>`` for classes that have one."""
    metrics: dict[str, float] = {}
    if results.masks is not None:
        metrics.update({k: v for k, v in results.masks.stats.items() if v != -1.0})
        metrics.update({"mask_AP_class_" + metric_safe(labels[c]): ap
                        for c, ap in results.masks.per_class_ap.items() if ap is not None})
    if results.panoptic is not None:
        metrics.update({k: v for k, v in results.panoptic.stats.items() if v != -1.0})
        metrics.update({"PQ_class_" + metric_safe(labels[c]): v["PQ"]
                        for c, v in results.panoptic.per_class.items() if v is not None})
    return metrics


def panoptic_rows(panoptic: PanopticQuality, labels: Mapping[int, str]) -> list[dict]:
    """``[{"class", "kind", "PQ", "SQ", "RQ", "TP", "FP", "FN"}]``: ``all``, ``things``,
    ``stuff`` (counts empty), then each category (``kind`` thing / stuff); values None where
    undefined. The Prefect ``panoptic-quality`` artifact and the report's PQ table."""
    rows = []
    for name, suffix in (("all", ""), ("things", "_th"), ("stuff", "_st")):
        values = {k: panoptic.stats[k + suffix] for k in ("PQ", "SQ", "RQ")}
        rows.append({"class": name, "kind": "mean", **{k: None if v == -1.0 else v
                                                       for k, v in values.items()},
                     "TP": None, "FP": None, "FN": None})
    for cat, numbers in panoptic.per_class.items():
        values = numbers or dict.fromkeys(_COLUMNS)
        rows.append({"class": labels[cat], "kind": "thing" if panoptic.isthing[cat] else "stuff",
                     **{k: values[k] if k in ("PQ", "SQ", "RQ") or values[k] is None
                        else int(values[k]) for k in _COLUMNS}})
    return rows


def metric_safe(label: str) -> str:
    """``label`` usable in an MLflow metric name: characters MLflow refuses (anything but
    letters, digits, ``_ - .`` and space) become ``_``."""
    return _METRIC_UNSAFE.sub("_", label)


def _write_json(path: Path, data: object) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
