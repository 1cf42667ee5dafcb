"""What the settings rules (:mod:`detr.settings`) and the tile rule (:mod:`detr.auto_tiles`)
read from a dataset: :class:`DatasetProfile`, from a COCO annotation file."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DatasetProfile:
    """What the rules read from a COCO annotation file (the training split).

    Sizes in source pixels; ``object_size_*`` are percentiles of sqrt(box width x height)
    over non-crowd boxes of things (None when the split has none): stuff segments (categories
    with ``isthing: 0``, panoptic data) need queries but are regions, not objects that must
    span a few feature cells, so they count in ``objects_*`` only.
    """

    images: int
    short_side: float  # median over images
    long_side: float
    aspect_p95: float  # 95th percentile of long / short side
    objects_max: int  # most boxes in one image
    objects_p95: float
    object_size_p10: float | None
    object_size_median: float | None

    @classmethod
    def from_coco(cls, coco: dict) -> DatasetProfile:
        """From a COCO dict (``images`` with width/height, ``annotations`` with bbox)."""
        images = coco.get("images") or []
        if not images:
            raise ValueError("no images: nothing to derive settings from")
        sides = np.array([(min(i["width"], i["height"]), max(i["width"], i["height"]))
                          for i in images], dtype=float)
        anns = [a for a in coco.get("annotations") or [] if not a.get("iscrowd", 0)]
        counts = Counter(a["image_id"] for a in anns)
        per_image = np.array([counts.get(i["id"], 0) for i in images])
        stuff = {c.get("id") for c in coco.get("categories") or [] if c.get("isthing", 1) == 0}
        sizes = np.sqrt([max(a["bbox"][2], 0) * max(a["bbox"][3], 0) for a in anns
                         if a.get("category_id") not in stuff])
        return cls(images=len(images), short_side=float(np.median(sides[:, 0])),
                   long_side=float(np.median(sides[:, 1])),
                   aspect_p95=float(np.percentile(sides[:, 1] / sides[:, 0], 95)),
                   objects_max=int(per_image.max()),
                   objects_p95=float(np.percentile(per_image, 95)),
                   object_size_p10=float(np.percentile(sizes, 10)) if len(sizes) else None,
                   object_size_median=float(np.median(sizes)) if len(sizes) else None)

    @classmethod
    def from_file(cls, path: str | Path) -> DatasetProfile:
        try:
            return cls.from_coco(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: cannot derive settings from it: {exc}") from exc
