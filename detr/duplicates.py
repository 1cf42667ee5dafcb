"""Duplicate detections: a second box on an object already boxed, and class-wise NMS.

Detections follow :mod:`detr.evaluation`'s contract: per image ``boxes`` [N, 4] absolute xyxy
pixels, ``scores`` [N], ``labels`` [N] (Tensors). A detection kept at a score threshold is a
duplicate when a detection of the same label with a higher score (ties: the one ranked first)
overlaps it with IoU above ``iou_threshold``: DETR promises one box per object, so each of
them is a box too many.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

DUPLICATE_IOU = 0.6  # IoU above which two same-class boxes are taken for one object


@dataclass(frozen=True)
class DuplicateCount:
    """At ``score_threshold``: ``boxes`` kept over all images, ``duplicates`` among them."""

    score_threshold: float
    boxes: int
    duplicates: int

    @property
    def fraction(self) -> float:
        """Duplicates per kept box (0.0 when no box is kept)."""
        return self.duplicates / self.boxes if self.boxes else 0.0


def duplicate_mask(detections: Mapping[str, Tensor], *, score_threshold: float,
                   iou_threshold: float = DUPLICATE_IOU) -> tuple[Tensor, Tensor]:
    """``(kept [N] bool, duplicate [N] bool)`` for one image's detections (module doc);
    a duplicate is always kept."""
    scores = torch.as_tensor(detections["scores"]).float()
    kept = scores >= score_threshold
    duplicate = torch.zeros_like(kept)
    index = kept.nonzero().flatten()
    if len(index) < 2:
        return kept, duplicate
    index = index[scores[index].argsort(descending=True, stable=True)]
    boxes = torch.as_tensor(detections["boxes"]).float()[index]
    labels = torch.as_tensor(detections["labels"])[index]
    overlap = (box_iou(boxes, boxes) > iou_threshold) & (labels[:, None] == labels[None, :])
    higher = torch.ones_like(overlap).tril(-1)  # [i, j]: j ranks above i
    duplicate[index] = (overlap & higher).any(dim=1)
    return kept, duplicate


def count_duplicates(predictions: Mapping[int, Mapping[str, Tensor]], *,
                     score_threshold: float,
                     iou_threshold: float = DUPLICATE_IOU) -> DuplicateCount:
    """Duplicates among the detections scoring >= ``score_threshold`` over all images."""
    boxes = duplicates = 0
    for detections in predictions.values():
        kept, duplicate = duplicate_mask(detections, score_threshold=score_threshold,
                                         iou_threshold=iou_threshold)
        boxes += int(kept.sum())
        duplicates += int(duplicate.sum())
    return DuplicateCount(score_threshold, boxes, duplicates)


def class_wise_nms(detections: Mapping[str, Tensor], iou_threshold: float) -> dict[str, Tensor]:
    """One image's detections without those that a higher-scoring detection of the same label
    overlaps with IoU > ``iou_threshold`` (``torchvision.ops.batched_nms``), best first.
    Other keys (per-detection rows, e.g. a segmentation model's query index or masks) are
    kept along."""
    boxes = torch.as_tensor(detections["boxes"]).float()
    scores = torch.as_tensor(detections["scores"]).float()
    labels = torch.as_tensor(detections["labels"])
    keep = batched_nms(boxes, scores, labels, iou_threshold)
    rows = {key: _rows(value, keep) for key, value in detections.items()
            if key not in ("boxes", "scores", "labels")}
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep], **rows}


def _rows(value, keep: Tensor):
    """``value``'s rows ``keep``: a tensor's or a list's (masks as RLE); a dict (a panoptic
    map, made apart from the detections) is not per detection and stays as it is."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        return [value[i] for i in keep.tolist()]
    value = torch.as_tensor(value)
    return value[keep.to(value.device)]
