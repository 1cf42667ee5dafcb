"""COCO box evaluation: the 12 COCOeval statistics, its summary table, per-class AP, PR curves.

Input contract (detections as they leave the detector): ``predictions`` maps an ``image_id``
of the ground truth to a dict with ``boxes`` [N, 4] absolute xyxy pixels, ``scores`` [N] and
``labels`` [N] that are already COCO category ids (Tensors on any device, or arrays/lists).
The ground truth is a pycocotools ``COCO`` object or the path of a COCO annotation json whose
annotations carry ``bbox`` ([x, y, w, h] pixels) and ``area``: COCO puts objects into the area
ranges by the annotation's ``area`` field (small < 32**2 <= medium < 96**2 <= large, bounds
inclusive on both sides), not by the box size.

Statistic names (``STAT_NAMES``, in ``COCOeval.stats`` order; IoU .50:.95 unless named, area
``all`` and 100 detections per image unless named):

    AP          average precision, IoU .50:.95
    AP50        average precision, IoU .50
    AP75        average precision, IoU .75
    AP_small    AP, area < 32**2        AP_medium  AP, 32**2..96**2      AP_large  AP, > 96**2
    AR_1        average recall, 1 detection per image
    AR_10       average recall, 10 detections per image
    AR_100      average recall, 100 detections per image
    AR_small    AR, area < 32**2        AR_medium  AR, 32**2..96**2      AR_large  AR, > 96**2

As in pycocotools, a statistic is -1.0 where it has nothing to average: an area range with no
ground-truth object in val (e.g. ``AP_large`` on a dataset of small objects). Consumers that
plot or compare statistics must treat -1 as "undefined", not as a score.

Per class, AP is AP@[.50:.95] (area all, 100 detections) over that class's entries of
``COCOeval.eval["precision"]``; a class with no ground truth in val has only -1 entries there
and gets ``None``. COCOeval averages over classes with ground truth only, so detections of a
class absent from val cost nothing. Labels that are not a category of the ground truth are
ignored by COCOeval, as in the official DETR evaluation.
"""

import contextlib
import functools
import io
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# One row per statistic, in COCOeval.stats order: (name, is_precision, IoU or None for
# .50:.95, area label, detections per image). Also the source of the summary line text.
_SUMMARY_ROWS = (
    ("AP", True, None, "all", 100),
    ("AP50", True, 0.5, "all", 100),
    ("AP75", True, 0.75, "all", 100),
    ("AP_small", True, None, "small", 100),
    ("AP_medium", True, None, "medium", 100),
    ("AP_large", True, None, "large", 100),
    ("AR_1", False, None, "all", 1),
    ("AR_10", False, None, "all", 10),
    ("AR_100", False, None, "all", 100),
    ("AR_small", False, None, "small", 100),
    ("AR_medium", False, None, "medium", 100),
    ("AR_large", False, None, "large", 100),
)
STAT_NAMES: tuple[str, ...] = tuple(row[0] for row in _SUMMARY_ROWS)
_DETECTION_KEYS = ("boxes", "scores", "labels")


@dataclass(frozen=True)
class PrecisionRecallCurve:
    """Interpolated precision against recall, area ``all``, 100 detections per image.

    ``recall``: the 101 COCO recall thresholds 0.00, 0.01, ..., 1.00. ``precision_50``:
    precision at each of them at IoU 0.50; ``precision_50_95``: the same averaged over the ten
    IoU thresholds .50:.05:.95. Precision is 0 at recalls the detections never reach. The
    curves are COCO's (precision made monotone from the right), the ones AP averages.
    """

    recall: tuple[float, ...]
    precision_50: tuple[float, ...]
    precision_50_95: tuple[float, ...]


@dataclass(frozen=True)
class CocoEvaluation:
    """The result of one COCOeval bbox run.

    ``stats``: the 12 statistics by ``STAT_NAMES`` (-1.0 where undefined, see the module doc).
    ``table``: pycocotools' own 12-line summary, as ``COCOeval.summarize()`` prints it, without
    the final newline. ``per_class_ap``: AP@[.50:.95] by category id, ``None`` for a category
    with no ground truth in the evaluated images. ``category_names``: name by category id.
    ``pr_curves``: by category id, only for categories with ground truth. ``pr_curve``: the
    mean over those categories, ``None`` when no category has ground truth.
    ``num_images``: images evaluated; ``num_detections``: detections submitted.
    """

    stats: dict[str, float]
    table: str
    per_class_ap: dict[int, float | None]
    category_names: dict[int, str]
    pr_curves: dict[int, PrecisionRecallCurve]
    pr_curve: PrecisionRecallCurve | None
    num_images: int
    num_detections: int
    prefix: str = ""  # "mask_" for COCOeval segm (detr.segm_evaluation): stats keys prefixed

    @property
    def names(self) -> tuple[str, ...]:
        """The keys of ``stats`` in ``COCOeval.stats`` order: ``prefix`` + ``STAT_NAMES``."""
        return tuple(self.prefix + name for name in STAT_NAMES)


def to_coco_results(predictions: Mapping[int, Mapping[str, object]]) -> list[dict]:
    """Detections by image id -> COCO results: ``image_id``, ``category_id``, ``bbox``, ``score``.

    Each value holds ``boxes`` [N, 4] absolute xyxy pixels, ``scores`` [N], ``labels`` [N]
    (category ids); N may be 0. The result boxes are absolute ``[x, y, w, h]`` floats.
    Raises ``ValueError`` naming the image and the key of a malformed entry.
    """
    results: list[dict] = []
    for image_id, detections in predictions.items():
        results.extend(_image_results(int(image_id), detections))
    return results


def load_ground_truth(coco_gt: COCO | str | Path) -> COCO:
    """A pycocotools ``COCO`` object, or the annotation json at a path loaded quietly."""
    if isinstance(coco_gt, COCO):
        return coco_gt
    path = Path(coco_gt)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth annotation file not found: {path}")
    with _quiet():
        return COCO(str(path))


def evaluate_detections(
    coco_gt: COCO | str | Path,
    predictions: Mapping[int, Mapping[str, object]],
    *,
    image_ids: Iterable[int] | None = None,
) -> CocoEvaluation:
    """Run COCOeval (``iouType="bbox"``) on detections and collect every number it gives.

    ``predictions`` follows the module's input contract; images of the ground truth with no
    entry count as images with no detections. ``image_ids`` restricts the evaluation to those
    ground-truth images (default: all of them). Empty predictions are valid and give 0 for
    every statistic with ground truth (-1 where undefined). pycocotools' prints are silenced
    except the summary, which is captured into ``table``.
    """
    gt = load_ground_truth(coco_gt)
    return summarise(gt, run_cocoeval(gt, predictions, image_ids=image_ids))


def summarise(gt: COCO, evaluator: COCOeval, *, prefix: str = "") -> CocoEvaluation:
    """Every number of an evaluated and accumulated ``evaluator`` (COCO's default IoUs, areas
    and maxDets) as a :class:`CocoEvaluation` whose ``stats`` keys are ``prefix`` + names."""
    table = _capture_summary(evaluator)
    cat_ids = [int(c) for c in evaluator.params.catIds]
    precision = _class_precision(evaluator)
    present = (precision > -1).any(axis=(0, 1))  # pycocotools leaves -1 where a class has no GT
    recall = tuple(float(r) for r in evaluator.params.recThrs)
    curves = {c: _curve(precision[:, :, k], recall) for k, c in enumerate(cat_ids) if present[k]}
    return CocoEvaluation(
        stats={prefix + n: float(v) for n, v in zip(STAT_NAMES, evaluator.stats, strict=True)},
        table=table,
        per_class_ap={c: _mean_valid(precision[:, :, k]) for k, c in enumerate(cat_ids)},
        category_names={c: str(gt.cats[c].get("name", c)) for c in cat_ids},
        pr_curves=curves,
        pr_curve=_curve(precision[:, :, present].mean(axis=2), recall) if curves else None,
        num_images=len(evaluator.params.imgIds),
        num_detections=len(evaluator.cocoDt.getAnnIds()),
        prefix=prefix,
    )


def run_cocoeval(
    coco_gt: COCO | str | Path,
    predictions: Mapping[int, Mapping[str, object]],
    *,
    image_ids: Iterable[int] | None = None,
    use_cats: bool = True,
    iou_thresholds: Iterable[float] | None = None,
    area_all_only: bool = False,
) -> COCOeval:
    """A bbox ``COCOeval`` over ``predictions`` (the module's input contract), evaluated and
    accumulated (``eval["precision"]`` [T, R, K, A, M], ``eval["recall"]`` [T, K, A, M]),
    quietly. ``use_cats=False`` merges every category into one (class-agnostic matching:
    K = 1); ``iou_thresholds`` replaces COCO's .50:.05:.95 (the statistic names and the
    summary then no longer apply). ``area_all_only``: evaluate the area range ``all`` only
    (A = 1, a quarter of the work; the summary no longer applies). ``image_ids``: as
    :func:`evaluate_detections`.
    """
    gt = load_ground_truth(coco_gt)
    evaluator = results_cocoeval(gt, to_coco_results(predictions), image_ids=image_ids,
                                 predicted_ids=predictions)
    evaluator.params.useCats = int(use_cats)
    if iou_thresholds is not None:
        evaluator.params.iouThrs = np.array(sorted(float(t) for t in iou_thresholds))
    if area_all_only:
        index = evaluator.params.areaRngLbl.index("all")
        evaluator.params.areaRng = [evaluator.params.areaRng[index]]
        evaluator.params.areaRngLbl = ["all"]
    with _quiet():
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def results_cocoeval(gt: COCO, results: list[dict], *, iou_type: str = "bbox",
                     image_ids: Iterable[int] | None = None,
                     predicted_ids: Iterable[int] = ()) -> COCOeval:
    """A ``COCOeval`` (not yet evaluated) of COCO result dicts against ``gt``: ``bbox`` results
    carry ``bbox``, ``segm`` results an RLE ``segmentation``; ``image_ids`` as
    :func:`evaluate_detections`; ``predicted_ids``: the images predictions were made for.
    Raises ``ValueError`` for unusable ground truth, or ids that are not images of it."""
    _check_ground_truth(gt, ("bbox", "area") + (("segmentation",) if iou_type == "segm" else ()))
    _check_image_ids((int(i) for i in predicted_ids), set(gt.getImgIds()), "predictions")
    evaluator = COCOeval(gt, _load_results(gt, results), iouType=iou_type)
    if image_ids is not None:
        chosen = sorted({int(i) for i in image_ids})
        _check_image_ids(chosen, set(gt.getImgIds()), "image_ids")
        evaluator.params.imgIds = chosen
    return evaluator


def format_summary(stats: Mapping[str, float], *, prefix: str = "") -> str:
    """The 12-line pycocotools summary rebuilt from named ``stats`` (e.g. a saved metrics file;
    keys ``prefix`` + ``STAT_NAMES``, e.g. ``mask_AP``).

    Identical to ``CocoEvaluation.table`` for the same statistics; raises ``KeyError`` naming
    a missing statistic.
    """
    missing = [prefix + name for name in STAT_NAMES if prefix + name not in stats]
    if missing:
        raise KeyError(f"stats lack {missing}; expected {prefix!r} + the names in STAT_NAMES")
    return "\n".join(_summary_line(row, float(stats[prefix + row[0]])) for row in _SUMMARY_ROWS)


def format_per_class(evaluation: CocoEvaluation) -> str:
    """Per-class AP@[.50:.95] as aligned text, one ``id  name  AP`` line per category."""
    width = max([len("name")] + [len(n) for n in evaluation.category_names.values()])
    lines = [f"{'id':>6}  {'name':<{width}}  AP@[.50:.95]"]
    for cat_id, ap in evaluation.per_class_ap.items():
        shown = "no gt" if ap is None else f"{ap:0.3f}"
        lines.append(f"{cat_id:>6}  {evaluation.category_names[cat_id]:<{width}}  {shown}")
    return "\n".join(lines)


def _summary_line(row: tuple, value: float) -> str:
    """One summary line in pycocotools' layout (fixed-width fields, 3 decimals)."""
    _, is_precision, iou, area, max_dets = row
    title, kind = ("Average Precision", "(AP)") if is_precision else ("Average Recall", "(AR)")
    iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
    return (
        f" {title:<18} {kind} @[ IoU={iou_text:<9} | area={area:>6} | "
        f"maxDets={max_dets:>3d} ] = {value:0.3f}"
    )


def _image_results(image_id: int, detections: Mapping[str, object]) -> list[dict]:
    """COCO result dicts for one image's detections, validated."""
    missing = [key for key in _DETECTION_KEYS if key not in detections]
    if missing:
        raise ValueError(f"detections of image {image_id} lack {missing}")
    boxes = _as_array(detections["boxes"])
    scores = _as_array(detections["scores"]).reshape(-1)
    labels = _as_array(detections["labels"]).reshape(-1)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    _check_detections(image_id, boxes, scores, labels)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return [
        {
            "image_id": image_id,
            "category_id": int(label),
            "bbox": [float(v) for v in box],
            "score": float(score),
        }
        for box, score, label in zip(xywh, scores, labels, strict=True)
    ]


def _as_array(value: object) -> np.ndarray:
    """A float64 numpy copy of a Tensor (any device or dtype, e.g. bf16), array or list."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def _check_detections(
    image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray
) -> None:
    """Raise ``ValueError`` naming the image for shapes or values COCOeval would misread."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes of image {image_id} have shape {boxes.shape}, expected [N, 4]")
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels"
        )
    if not np.isfinite(boxes).all() or not np.isfinite(scores).all():
        raise ValueError(f"boxes or scores of image {image_id} are not all finite")
    if (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError(f"boxes of image {image_id} are not x1 <= x2, y1 <= y2 (xyxy pixels)")
    if (labels != np.round(labels)).any():
        raise ValueError(f"labels of image {image_id} are not integer category ids")


def _check_ground_truth(gt: COCO, keys: tuple[str, ...]) -> None:
    """Raise ``ValueError`` for ground truth COCOeval cannot score meaningfully (an
    annotation lacking one of ``keys``)."""
    if not gt.getImgIds() or not gt.getCatIds():
        raise ValueError("ground truth has no images or no categories: nothing to evaluate")
    for ann in gt.dataset.get("annotations", []):
        lacking = [key for key in keys if key not in ann]
        if lacking:
            raise ValueError(f"ground-truth annotation {ann.get('id')} lacks {lacking}")


def _check_image_ids(ids: Iterable[int], known: set[int], what: str) -> None:
    """Raise ``ValueError`` listing ids that are not images of the ground truth."""
    unknown = sorted(set(ids) - known)
    if unknown:
        raise ValueError(f"{what} name images not in the ground truth: {unknown[:10]}")


def _load_results(gt: COCO, results: list[dict]) -> COCO:
    """A results ``COCO`` object; for no detections an empty one (``loadRes([])`` raises)."""
    with _quiet():
        if results:
            return gt.loadRes(results)
        empty = COCO()
        empty.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": list(gt.dataset.get("categories", [])),
            "annotations": [],
        }
        empty.createIndex()
        return empty


def _capture_summary(evaluator: COCOeval) -> str:
    """Run ``summarize()`` and return what it prints, the 12 lines without a final newline.

    pycocotools reports only through ``print``. Its module gets a ``print`` that writes to a
    buffer for the call: capturing ``sys.stdout`` alone misses the table where a framework has
    replaced the builtin (Prefect's ``log_prints`` sends stdout prints to a run logger; an
    explicit ``file`` is passed through)."""
    buffer = io.StringIO()
    module = sys.modules[type(evaluator).__module__]
    module.print = functools.partial(print, file=buffer)
    try:
        evaluator.summarize()
    finally:
        del module.print
    return buffer.getvalue().rstrip("\n")


def _class_precision(evaluator: COCOeval) -> np.ndarray:
    """``eval["precision"]`` at area ``all`` and 100 detections: [T=10 IoUs, R=101, K classes].

    The IoU axis starts at 0.50 (COCOeval's default thresholds .50:.05:.95, which the
    summary's names assume too).
    """
    params = evaluator.params
    if not np.isclose(params.iouThrs[0], 0.5):
        raise ValueError(f"expected COCO's IoU thresholds from 0.50, got {params.iouThrs}")
    area = params.areaRngLbl.index("all")
    max_dets = params.maxDets.index(100)
    return evaluator.eval["precision"][:, :, :, area, max_dets]


def _mean_valid(values: np.ndarray) -> float | None:
    """Mean over entries > -1, ``None`` if there are none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def _curve(precision: np.ndarray, recall: tuple[float, ...]) -> PrecisionRecallCurve:
    """A class's curve from its [T, R] precision (all entries valid) at the R recalls."""
    return PrecisionRecallCurve(
        recall=recall,
        precision_50=tuple(float(p) for p in precision[0]),
        precision_50_95=tuple(float(p) for p in precision.mean(axis=0)),
    )


def _quiet() -> contextlib.AbstractContextManager:
    """Swallow pycocotools' progress prints (it writes to stdout with ``print``)."""
    return contextlib.redirect_stdout(io.StringIO())
