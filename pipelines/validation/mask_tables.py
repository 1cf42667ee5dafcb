"""The ``masks`` table: one row per annotation, its ``segmentation`` measured.

Built by :func:`mask_frame` from the raw split jsons and the ``images`` table
(:mod:`pipelines.validation.dataset_tables`); None when no annotation has a segmentation, so a
box-only dataset gets no mask checks and pays nothing. Columns (null where they do not apply):

- split, id, image_id, file_name (the image's; the record keys in the report), kind
  (``polygon``, ``rle``, ``other`` or ``none``);
- has_segmentation: non-crowd rows: the annotation has a (non-empty) segmentation;
- polygon_well_formed: polygons only: a list of polygons, each an even number >= 6 of finite
  coordinates (an ``other`` segmentation is False here too);
- polygon_outside_px: polygons only: how far (px) the furthest vertex lies outside the image;
- rle_decodes: RLEs only: ``{"size": [h, w], "counts": ...}`` whose run lengths decode and sum
  to h * w; rle_size_matches_image: its size is the image's [height, width];
- mask_area: pixels of the mask; mask_area_error: ``max(0, |mask_area - area| -``
  :data:`AREA_SLACK_PX` ``) / max(mask_area, area)`` (the relative mismatch, a few pixels
  forgiven for tiny objects);
- mask_box_gap_px: how far (px) the bbox's furthest edge lies from the mask's tight box, less
  :data:`BOX_SLACK_FRACTION` of the bbox's longer side; null for an empty mask;
- overlap_px: non-crowd rows of splits with a stuff category (``isthing: 0``; panoptic data):
  pixels this segment shares with another non-crowd segment of its image.

Masks are measured on pycocotools' RLEs (area, box) without decoding; only the overlap check
decodes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from detr.data.layout import SPLITS
from detr.data.masks import (
    MaskError,
    has_segmentation,
    is_finite_number,
    segmentation_problem,
    segmentation_to_rle,
)

AREA_SLACK_PX = 4  # |mask area - area| up to this many px is no mismatch (tiny objects)
BOX_SLACK_FRACTION = 0.1  # bbox edges may lie this fraction of the box's longer side off
COLUMNS = ["split", "id", "image_id", "file_name", "kind", "has_segmentation",
           "polygon_well_formed", "polygon_outside_px", "rle_decodes", "rle_size_matches_image",
           "mask_area", "mask_area_error", "mask_box_gap_px", "overlap_px"]


def mask_frame(raw: dict[str, dict], images: pd.DataFrame) -> pd.DataFrame | None:
    """The masks table (module docstring) of the raw split jsons; None when no annotation of
    any split has a segmentation."""
    if not any(isinstance(a, dict) and has_segmentation(a)
               for split in SPLITS for a in raw[split]["annotations"]):
        return None
    sizes = _image_sizes(images)
    rows, rles = [], []
    for split in SPLITS:
        # stuff (isthing 0): panoptic data, where each pixel has one segment; instances of
        # things alone may overlap (occlusion)
        panoptic = any(isinstance(c, dict) and c.get("isthing") == 0
                       for c in raw[split]["categories"])
        for ann in raw[split]["annotations"]:
            if not isinstance(ann, dict):
                continue
            size = sizes.get((split, ann.get("image_id")), (None, None, None))
            row, rle = _measure(ann, *size[:2])
            if not ann.get("iscrowd", 0):
                row["has_segmentation"] = row["kind"] != "none"
            row.update(split=split, id=ann.get("id"), image_id=ann.get("image_id"),
                       file_name=size[2])
            rows.append(row)
            rles.append(rle if panoptic and not ann.get("iscrowd", 0) else None)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["overlap_px"] = pd.Series(_overlaps(frame, rles), index=frame.index, dtype="float64")
    return frame


def _image_sizes(images: pd.DataFrame) -> dict[tuple, tuple]:
    """(split, image id) -> (height, width, file_name), for images with a declared size."""
    known = images.dropna(subset=["id", "width", "height"]).drop_duplicates(["split", "id"])
    known = known[(known["width"] >= 1) & (known["height"] >= 1)]
    return {(s, i): (int(h), int(w), f) for s, i, h, w, f in zip(
        known["split"], known["id"], known["height"], known["width"], known["file_name"],
        strict=True)}


def _measure(ann: dict, height: int | None,
             width: int | None) -> tuple[dict[str, Any], dict | None]:
    """The row's measures, and the annotation's RLE if it decodes on its image's grid."""
    if not has_segmentation(ann):
        return {"kind": "none"}, None
    segm = ann["segmentation"]
    row: dict[str, Any] = {"kind": "rle" if isinstance(segm, dict) else
                           "polygon" if isinstance(segm, list) else "other"}
    rle, on_image = None, False
    if row["kind"] == "rle":
        rle = _rle(segm)
        row["rle_decodes"] = rle is not None
        if rle is not None and height is not None:
            on_image = row["rle_size_matches_image"] = list(rle["size"]) == [height, width]
    else:
        row["polygon_well_formed"] = segmentation_problem(segm) is None
        if row["polygon_well_formed"] and height is not None:
            row["polygon_outside_px"] = _outside(segm, height, width)
            # pycocotools allocates along the outline: far-away vertices are only reported
            if row["polygon_outside_px"] <= max(height, width):
                rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
                on_image = True
    if rle is not None:
        row.update(_compare(rle, ann.get("area"), ann.get("bbox")))
    return row, rle if on_image else None


def _rle(segm: dict) -> dict | None:
    """``segm`` as a compressed RLE of its own size, or None when it does not decode."""
    if segmentation_problem(segm) is not None:
        return None
    height, width = (int(v) for v in segm["size"])
    try:
        return segmentation_to_rle(segm, height, width)
    except MaskError:
        return None


def _outside(polygons: list[list[float]], height: int, width: int) -> float:
    xs = np.array([v for p in polygons for v in p[0::2]], dtype=np.float64)
    ys = np.array([v for p in polygons for v in p[1::2]], dtype=np.float64)
    return float(max(0.0, -xs.min(), -ys.min(), xs.max() - width, ys.max() - height))


def _compare(rle: dict, area: Any, bbox: Any) -> dict[str, Any]:
    """mask_area, mask_area_error and mask_box_gap_px of a mask against ``area``, ``bbox``."""
    mask_area = int(mask_utils.area(rle))
    out: dict[str, Any] = {"mask_area": mask_area}
    if is_finite_number(area) and area > 0:
        mismatch = max(0.0, abs(mask_area - area) - AREA_SLACK_PX)
        out["mask_area_error"] = mismatch / max(mask_area, area)
    numbers = isinstance(bbox, list) and len(bbox) == 4 and all(map(is_finite_number, bbox))
    if numbers and mask_area > 0:
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        bx, by, bw, bh = (float(v) for v in bbox)
        gap = max(abs(bx - x), abs(by - y), abs(bx + bw - x - w), abs(by + bh - y - h))
        out["mask_box_gap_px"] = max(0.0, gap - BOX_SLACK_FRACTION * max(bw, bh))
    return out


def _overlaps(frame: pd.DataFrame, rles: list[dict | None]) -> list[float | None]:
    """Per row: pixels shared with another tracked segment of its image (None: untracked)."""
    result: list[float | None] = [None] * len(rles)
    groups: dict[tuple, list[int]] = {}
    for i, (split, image_id) in enumerate(zip(frame["split"], frame["image_id"], strict=True)):
        if rles[i] is not None:
            groups.setdefault((split, image_id), []).append(i)
    for rows in groups.values():
        masks = mask_utils.decode([rles[i] for i in rows])  # [H, W, n]
        shared = masks.sum(axis=2, dtype=np.int32) > 1
        for k, i in enumerate(rows):
            result[i] = float(np.count_nonzero(shared & (masks[..., k] > 0)))
    return result
