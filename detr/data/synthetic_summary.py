"""What a generated split holds: the counts :func:`detr.data.synthetic.generate` returns (per
category, per COCO size range, objects per image, box sides) from its COCO dict."""

from __future__ import annotations

import math
from typing import Any

# COCO's size ranges by box area (px^2): small < 32^2 <= medium < 96^2 <= large.
AREA_RANGES = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, math.inf)}


def size_class(area: float) -> str:
    """``small``, ``medium`` or ``large`` for a box area in px^2."""
    return next(k for k, (lo, hi) in AREA_RANGES.items() if lo <= area < hi)


def split_summary(coco: dict[str, Any], skipped: int) -> dict[str, Any]:
    """Counts of one split; ``objects_per_image`` and ``box_side_px`` (sqrt(area)) are
    ``[min, max]`` over what was placed (``[0, 0]`` with no images)."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_category = dict.fromkeys(names.values(), 0)
    area_ranges = dict.fromkeys(AREA_RANGES, 0)
    per_image = dict.fromkeys((img["id"] for img in coco["images"]), 0)
    for ann in coco["annotations"]:
        per_category[names[ann["category_id"]]] += 1
        area_ranges[size_class(ann["area"])] += 1
        per_image[ann["image_id"]] += 1
    sides = [math.sqrt(a["area"]) for a in coco["annotations"]] or [0.0]
    counts = list(per_image.values()) or [0]
    return {"images": len(coco["images"]), "annotations": len(coco["annotations"]),
            "skipped": skipped, "objects_per_image": [min(counts), max(counts)],
            "box_side_px": [round(min(sides), 1), round(max(sides), 1)],
            "per_category": per_category, "area_ranges": area_ranges}
