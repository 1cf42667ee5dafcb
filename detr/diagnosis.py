"""Why a detector is weak: findings from its val detections and training curves, each naming
the setting to change.

Pure: numbers and detections in, :class:`Finding` out; no files. Detections follow
:mod:`detr.evaluation`'s contract; the ground truth is a pycocotools ``COCO``; ``params`` are a
training checkpoint's (``model``, ``loss``, ``data``, ``train`` sections, as plain dicts).
Each finding has a one-line ``summary`` of what was measured, its ``values`` (named numbers)
and, when it shows a weakness, a ``verdict``: ``"found: <what>; turn: <params key> to
<value>"`` (alternatives joined by ``or``).

- ``object_size``: val object sizes after the val resize (short side to ``max(data.scales)``,
  long side <= ``data.max_size``), in cells of the finest feature stride; weak when more
  than ``MAX_UNDER_ONE_CELL`` of the objects (by sqrt of the box area) are under one cell.
- ``classification``: class-agnostic AP (COCOeval ``useCats=0``: every category merged, so
  only the boxes count) against AP; weak when boxes are placed but classes are wrong.
- ``recall``: recall at IoU 0.1 (mean over classes, 100 detections): is there a box near the
  objects at all; weak under ``MIN_RECALL_IOU10``.
- ``decoder_layers``: AP of each decoder layer's detections (the aux outputs).
- ``loss_trend``: relative drop of a line fitted to the last quarter (>= 3) of the epoch
  losses; weak above ``STILL_FALLING`` (train longer).
- ``val_curve``: val AP during training, best evaluation against the last.
- ``duplicates``: detections that are a second box on an object already boxed
  (:mod:`detr.duplicates`) at the stage's score threshold and at 0.3, and the AP with
  class-wise NMS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools.coco import COCO

from detr.duplicates import DUPLICATE_IOU, class_wise_nms, count_duplicates
from detr.evaluation import run_cocoeval
from detr.models.backbone import LAST_STAGES, output_stride

MAX_UNDER_ONE_CELL = 0.05  # share of val objects under one feature cell that makes a finding
MIN_RECALL_IOU10 = 0.5  # below it most objects have no box near them at all
CLASS_GAP = 1.5  # class-agnostic AP this many times AP (and 0.05 above it): classes are wrong
STILL_FALLING = 0.05  # loss drop over the last quarter of training that says "train longer"
MAX_DUPLICATES = 0.03  # share of kept boxes that are duplicates (issue 18: under 3%)
LOW_SCORE = 0.3  # the second threshold duplicates are counted at
_SCALE_STEP = 32  # suggested scales are rounded up to multiples of this


@dataclass(frozen=True)
class Finding:
    """One diagnosis (module doc). ``turns``: (params key, suggested value) alternatives."""

    name: str
    summary: str
    values: dict[str, float] = field(default_factory=dict)
    found: str | None = None
    turns: tuple[tuple[str, str], ...] = ()

    @property
    def weak(self) -> bool:
        return self.found is not None

    @property
    def verdict(self) -> str | None:
        if self.found is None:
            return None
        turn = " or ".join(f"{key} to {value}" for key, value in self.turns)
        return f"found: {self.found}" + (f"; turn: {turn}" if turn else "")

    def to_dict(self) -> dict:
        return {"name": self.name, "summary": self.summary, "weak": self.weak,
                "verdict": self.verdict, "values": dict(self.values)}


def val_scale(height: float, width: float, scales: Sequence[int], max_size: int) -> float:
    """The val resize factor of an image (``detr.data.transforms`` ``"val"``)."""
    return min(max(scales) / min(height, width), max_size / max(height, width))


def object_cells(gt: COCO, *, scales: Sequence[int], max_size: int, stride: int,
                 tile: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(sqrt_area, short_side)`` of every non-crowd val box after the val resize, in feature
    cells of ``stride`` px; with ``tile`` (tiled prediction), the resize of a tile of that
    side (or of the image, when smaller) instead of the whole image's."""
    sizes = []
    for ann in gt.dataset.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        image = gt.imgs[ann["image_id"]]
        height, width = image["height"], image["width"]
        if tile:
            height, width = min(height, tile), min(width, tile)
        factor = val_scale(height, width, scales, max_size) / stride
        w, h = ann["bbox"][2:]
        sizes.append((math.sqrt(max(w * h, 0.0)) * factor, min(w, h) * factor))
    cells = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    return cells[:, 0], cells[:, 1]


def size_finding(sqrt_area: np.ndarray, short_side: np.ndarray, *, scales: Sequence[int],
                 max_size: int, stride: int, last_stage: str | None,
                 tile: int | None = None) -> Finding:
    """Weak when over ``MAX_UNDER_ONE_CELL`` of the objects are under one cell: bigger scales
    that bring the 5th percentile to one cell, or an earlier ``model.last_stage``."""
    if not len(sqrt_area):
        return Finding("object_size", "no val objects")
    under = float((sqrt_area < 1).mean())
    values = {"median_cells": float(np.median(sqrt_area)), "under_one_cell": under,
              "short_side_under_one_cell": float((short_side < 1).mean()), "stride": stride}
    where = f"tiles of {tile} px at " if tile else ""
    summary = (f"val objects ({where}the val scale: {max(scales)} px short side, max {max_size}) are "
               f"{values['median_cells']:.2g} cells of {stride} px wide (median, sqrt area); "
               f"{under:.0%} under one cell ({values['short_side_under_one_cell']:.0%} by the "
               f"shorter side)")
    if under <= MAX_UNDER_ONE_CELL:
        return Finding("object_size", summary, values)
    factor = 1 / max(float(np.quantile(sqrt_area, MAX_UNDER_ONE_CELL)), 1e-3)
    turns = (("data.scales", _scaled(scales, max_size, factor)),)
    stage = _earlier_stage(last_stage, stride, factor, scales, max_size)
    if stage:
        turns += (("model.last_stage", stage),)
    return Finding("object_size", summary, values,
                   f"{under:.0%} of the val objects are under one feature cell ({stride} px) "
                   f"at the val scale: the model cannot see them", turns)


def _ap(value: float) -> str:
    """An AP as text: 3 decimals, or 2 significant digits below 0.01 (0.00037, not 0.000)."""
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}"


def _scaled(scales: Sequence[int], max_size: int, factor: float) -> str:
    """``"[s1, s2] and data.max_size to m"``: the scales and max size times ``factor``, rounded
    up to multiples of ``_SCALE_STEP``."""
    def up(size: float) -> int:
        return int(math.ceil(size / _SCALE_STEP) * _SCALE_STEP)
    return f"{[up(s * factor) for s in scales]} and data.max_size to {up(max_size * factor)}"


def _earlier_stage(last_stage: str | None, stride: int, factor: float, scales: Sequence[int],
                   max_size: int) -> str | None:
    """The latest earlier ResNet stage whose stride alone shows the objects ``factor`` times
    larger, else the earliest with the scales for the rest; None when there is none."""
    if last_stage not in LAST_STAGES:
        return None
    earlier = [(s, output_stride(s)) for s in LAST_STAGES[:LAST_STAGES.index(last_stage)]]
    earlier = [(s, finer) for s, finer in earlier if finer < stride]
    for stage, finer in reversed(earlier):
        if finer <= stride / factor:
            return stage
    if not earlier:
        return None
    stage, finer = earlier[0]
    return f"{stage} and data.scales to {_scaled(scales, max_size, factor * finer / stride)}"


def mean_ap(evaluator) -> float:
    """AP of an accumulated COCOeval: precision averaged over its IoUs from 0.5 up, recalls
    and classes (area ``all``, 100 detections), -1 entries (no ground truth) left out; 0.0 if
    none."""
    p = evaluator.params
    precision = evaluator.eval["precision"][np.asarray(p.iouThrs) >= 0.5 - 1e-9, :, :,
                                            p.areaRngLbl.index("all"), p.maxDets.index(100)]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


def recall_at(evaluator, iou: float) -> float:
    """Recall at IoU threshold ``iou`` (one of the evaluator's), area all, 100 detections,
    averaged over classes with ground truth; 0.0 if none."""
    p = evaluator.params
    t = int(np.argmin(np.abs(np.asarray(p.iouThrs) - iou)))
    recall = evaluator.eval["recall"][t, :, p.areaRngLbl.index("all"), p.maxDets.index(100)]
    valid = recall[recall > -1]
    return float(valid.mean()) if valid.size else 0.0


_IOUS = (0.1, *np.linspace(0.5, 0.95, 10))  # COCO's, and 0.1 for "found at all"


def class_agnostic(gt: COCO, predictions: Mapping[int, Mapping]) -> tuple[float, float]:
    """``(AP@[.50:.95], recall at IoU 0.1)`` with every category merged into one (only the
    boxes count, not their classes), from one COCOeval pass."""
    evaluator = run_cocoeval(gt, predictions, use_cats=False, iou_thresholds=_IOUS,
                             area_all_only=True)
    return mean_ap(evaluator), recall_at(evaluator, 0.1)


def class_agnostic_ap(gt: COCO, predictions: Mapping[int, Mapping]) -> float:
    """AP@[.50:.95] with every category merged into one (only localisation counts)."""
    return class_agnostic(gt, predictions)[0]


def recall_iou10(gt: COCO, predictions: Mapping[int, Mapping], *, use_cats: bool = True) -> float:
    """Recall at IoU 0.1: the share of objects with a detection (of their class, unless
    ``use_cats`` is False) overlapping them at all."""
    return recall_at(run_cocoeval(gt, predictions, use_cats=use_cats, iou_thresholds=(0.1,),
                                  area_all_only=True), 0.1)


def layer_aps(gt: COCO, layer_predictions: Sequence[Mapping[int, Mapping]]) -> list[float]:
    """AP@[.50:.95] of each decoder layer's detections, first layer first."""
    return [mean_ap(run_cocoeval(gt, found, area_all_only=True)) for found in layer_predictions]


def classification_finding(ap: float, agnostic_ap: float, *, num_classes: int,
                           ce_loss_coef: float | None) -> Finding:
    """Weak when the boxes are right but the classes wrong (``CLASS_GAP``)."""
    values = {"class_agnostic_AP": agnostic_ap}
    summary = f"class-agnostic AP {_ap(agnostic_ap)} against AP {_ap(ap)} ({num_classes} classes)"
    if num_classes < 2 or agnostic_ap < CLASS_GAP * ap or agnostic_ap - ap < 0.05:
        return Finding("classification", summary, values)
    value = f"{2 * ce_loss_coef:g}" if ce_loss_coef else "a larger value"
    return Finding("classification", summary, values,
                   f"boxes are placed (class-agnostic AP {_ap(agnostic_ap)}) but their classes "
                   f"are wrong (AP {_ap(ap)})", (("loss.ce_loss_coef", value),))


def recall_finding(recall: float, recall_any_class: float, *,
                   fallback: tuple[tuple[str, str], ...]) -> Finding:
    """Weak when under ``MIN_RECALL_IOU10`` of the objects have a box near them; ``fallback``:
    the turns to suggest (the size finding's where it is weak, else train longer)."""
    values = {"recall_iou10": recall, "recall_iou10_any_class": recall_any_class}
    summary = (f"recall at IoU 0.1: {recall:.3f} with the right class, {recall_any_class:.3f} "
               f"of any class (found at all?)")
    if recall >= MIN_RECALL_IOU10:
        return Finding("recall", summary, values)
    return Finding("recall", summary, values,
                   f"{1 - recall:.0%} of the val objects get no box of their class even at "
                   f"IoU 0.1: they are not found at all", fallback)


def layer_finding(aps: Sequence[float], dec_layers: int) -> Finding:
    """Weak when an earlier decoder layer beats the last, or AP still climbs at the last."""
    values = {f"AP_layer_{i}": ap for i, ap in enumerate(aps)}
    summary = "AP by decoder layer: " + ", ".join(f"{_ap(ap)}" for ap in aps)
    if len(aps) < 2:
        return Finding("decoder_layers", "one decoder output (model.aux_loss off, or one "
                                         "layer): no AP per layer", values)
    best = int(np.argmax(aps))
    last, before = aps[-1], aps[-2]
    if aps[best] - last > max(0.01, 0.05 * last):
        return Finding("decoder_layers", summary, values,
                       f"decoder layer {best + 1} scores AP {_ap(aps[best])}, the last "
                       f"{_ap(last)}: the layers after it do not help",
                       (("model.dec_layers", str(best + 1)),))
    if last - before > max(0.01, 0.1 * last):
        return Finding("decoder_layers", summary, values,
                       f"AP still climbs at the last decoder layer ({_ap(before)} -> {_ap(last)})",
                       (("model.dec_layers", str(dec_layers + 2)),))
    return Finding("decoder_layers", summary, values)


def relative_drop(losses: Sequence[float]) -> float | None:
    """The drop of a line fitted to the last quarter (at least 3) of ``losses``, relative to
    its start: 0.1 = the loss fell 10% over that stretch; None for fewer than 3 values."""
    values = np.asarray([v for v in losses if math.isfinite(v)], dtype=np.float64)
    if len(values) < 3:
        return None
    tail = values[-max(3, math.ceil(len(values) / 4)):]
    slope, start = np.polyfit(np.arange(len(tail)), tail, 1)
    return float(-slope * (len(tail) - 1) / start) if start > 0 else None


def loss_finding(losses: Sequence[float], *, length: tuple[str, str]) -> Finding:
    """Weak when the loss still fell by more than ``STILL_FALLING`` at the end."""
    drop = relative_drop(losses)
    if drop is None:
        return Finding("loss_trend", f"{len(losses)} epoch losses: too few to tell a trend")
    summary = f"training loss over the last quarter of {len(losses)} epochs: {-drop:+.1%}"
    values = {"loss_drop_last_quarter": drop}
    if drop <= STILL_FALLING:
        return Finding("loss_trend", summary, values)
    return Finding("loss_trend", summary, values,
                   f"the training loss was still falling at the end ({-drop:+.1%} over the "
                   f"last quarter): train longer", (length,))


def val_curve_finding(curve: Sequence[tuple[int, float]], *,
                      length: tuple[str, str]) -> Finding:
    """``curve``: (step, val AP) of the evaluations during training. Weak when the best is the
    last and still rose by over ``STILL_FALLING`` since the one before (train longer)."""
    if not curve:
        return Finding("val_curve", "no val AP during training (train.eval_every_steps: 0)")
    best_step, best = max(curve, key=lambda row: row[1])
    last_step, last = curve[-1]
    values = {"val_AP_best": best, "val_AP_best_step": best_step, "val_AP_last": last,
              "val_AP_last_step": last_step}
    summary = (f"val AP during training: best {_ap(best)} at step {best_step}, last {_ap(last)} "
               f"at step {last_step} ({len(curve)} evaluations)")
    if len(curve) > 1 and best_step == last_step and last > (1 + STILL_FALLING) * curve[-2][1]:
        return Finding("val_curve", summary, values,
                       f"val AP still rose at the last evaluation ({_ap(curve[-2][1])} -> "
                       f"{_ap(last)}): train longer", (length,))
    return Finding("val_curve", summary, values)


def duplicate_finding(gt: COCO, predictions: Mapping[int, Mapping], *, score_threshold: float,
                      ap: float, nms: float | None = None,
                      raw: Mapping[int, Mapping] | None = None) -> Finding:
    """Duplicates the model draws at ``score_threshold`` and ``LOW_SCORE``. Without ``nms``
    (``evaluate.nms``): counted on ``predictions``, with the AP class-wise NMS at
    ``DUPLICATE_IOU`` would give; weak above ``MAX_DUPLICATES``, turning ``evaluate.nms`` on.
    With ``nms``: counted on ``raw`` (the detections before it, when given), with their AP."""
    model = raw if nms is not None and raw is not None else predictions
    counts = [count_duplicates(model, score_threshold=t)
              for t in dict.fromkeys((score_threshold, LOW_SCORE))]
    values: dict[str, float] = {}
    for c in counts:
        values.update({f"duplicates_{c.score_threshold:g}": c.fraction,
                       f"duplicates_count_{c.score_threshold:g}": c.duplicates,
                       f"boxes_{c.score_threshold:g}": c.boxes})
    drawn = "; ".join(f"{c.duplicates} of {c.boxes} boxes ({c.fraction:.1%}) at score >= "
                      f"{c.score_threshold:g} are a second box on an object"
                      for c in counts)
    if nms is not None:
        values["AP_without_nms"] = raw_ap = mean_ap(run_cocoeval(gt, model, area_all_only=True))
        return Finding("duplicates", f"the model draws: {drawn}; evaluate.nms {nms:g} removes "
                                     f"them: AP {_ap(ap)} (without: {_ap(raw_ap)})", values)
    values["AP_class_wise_nms"] = nms_ap = mean_ap(run_cocoeval(
        gt, {i: class_wise_nms(d, DUPLICATE_IOU) for i, d in model.items()}, area_all_only=True))
    summary = f"{drawn}; AP {_ap(ap)}, with class-wise NMS {_ap(nms_ap)}"
    main = counts[0]
    if main.fraction <= MAX_DUPLICATES:
        return Finding("duplicates", summary, values)
    return Finding("duplicates", summary, values,
                   f"{main.fraction:.0%} of the boxes at score >= {score_threshold:g} are a "
                   f"second box on an object already boxed (same class, IoU > "
                   f"{DUPLICATE_IOU:g}); class-wise NMS gives AP {_ap(nms_ap)} (now {_ap(ap)})",
                   (("evaluate.nms", f"{DUPLICATE_IOU:g}"),) if nms_ap > ap else ())


@dataclass(frozen=True)
class Diagnosis:
    """The findings of :func:`diagnose`, in the module doc's order."""

    findings: tuple[Finding, ...]

    def metrics(self) -> dict[str, float]:
        """Every finding's values as ``diag_<name>`` (e.g. ``diag_recall_iou10``)."""
        return {f"diag_{k}": float(v) for f in self.findings for k, v in f.values.items()}

    def verdicts(self) -> list[str]:
        return [f.verdict for f in self.findings if f.verdict]

    def to_dict(self) -> dict:
        return {"verdicts": self.verdicts(), "findings": [f.to_dict() for f in self.findings],
                "metrics": self.metrics()}


def diagnose(gt: COCO, predictions: Mapping[int, Mapping], *, params: Mapping[str, Mapping],
             stride: int, ap: float, layer_predictions: Sequence[Mapping] | None = None,
             losses: Sequence[float] = (), val_curve: Sequence[tuple[int, float]] = (),
             score_threshold: float = 0.5, nms: float | None = None,
             raw_predictions: Mapping[int, Mapping] | None = None,
             tile: int | None = None) -> Diagnosis:
    """All findings of the module doc for one model's val ``predictions`` (and, when given,
    every decoder layer's, the last being ``predictions``; the epoch ``losses``; the
    ``val_curve`` of (step, AP)). ``ap``: the model's AP@[.50:.95]; ``stride``: its
    finest feature level's stride in px (``DETR.feature_stride``: the backbone's output
    stride, or the finest of ``model.feature_levels``); ``params``: its checkpoint's;
    ``nms``: the class-wise NMS applied to ``predictions`` (``raw_predictions``: before it);
    ``tile``: the tile side of a tiled prediction (sizes are then the tiles' resize)."""
    model, data = params.get("model", {}), params.get("data", {})
    sizes = size_finding(*object_cells(gt, scales=data["scales"], max_size=data["max_size"],
                                       stride=stride, tile=tile),
                         scales=data["scales"], max_size=data["max_size"], stride=stride,
                         last_stage=model.get("last_stage"), tile=tile)
    length = training_length(params.get("train", {}))
    agnostic_ap, agnostic_recall = class_agnostic(gt, predictions)
    findings = [
        sizes,
        classification_finding(ap, agnostic_ap, num_classes=len(gt.getCatIds()),
                               ce_loss_coef=params.get("loss", {}).get("ce_loss_coef")),
        recall_finding(recall_iou10(gt, predictions), agnostic_recall,
                       fallback=sizes.turns if sizes.weak else (length,)),
        layer_finding(layer_aps(gt, layer_predictions[:-1]) + [ap] if layer_predictions
                      else [ap], int(model.get("dec_layers", 1))) if not tile else
        Finding("decoder_layers", "tiled prediction merges the tiles' detections: no AP "
                                  "per decoder layer"),
        loss_finding(losses, length=length),
        val_curve_finding(val_curve, length=length),
        duplicate_finding(gt, predictions, score_threshold=score_threshold, ap=ap, nms=nms,
                          raw=raw_predictions),
    ]
    return Diagnosis(tuple(findings))


def training_length(train: Mapping) -> tuple[str, str]:
    """The params key that sets the training's length and twice its value: ``train.steps``
    where the train section has one set, else ``train.epochs``."""
    for key in ("steps", "epochs"):
        if train.get(key):
            return f"train.{key}", str(2 * int(train[key]))
    return "train.epochs", "a larger value"
