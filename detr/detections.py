"""One image's detections as they leave :mod:`detr`, and their serialisations (COCO results,
JSON records, with COCO RLE ``segmentation`` when the model gives masks)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from torch import Tensor

from detr.evaluation import to_coco_results
from detr.segm_evaluation import encode_masks


@dataclass(frozen=True)
class Detections:
    """One image's detections, best score first.

    ``boxes`` float32 [N, 4] absolute xyxy pixels of the original image, clipped to it;
    ``scores`` float32 [N] in [0, 1], descending; ``labels`` int64 [N] category ids;
    ``names`` the N category names; ``image_size`` (height, width) of the original image.
    Segmentation models only (else None): ``masks`` bool [N, H, W] at the original size, row
    i = detection i; ``panoptic`` (when asked) ``{"segments": int32 [H, W] (0 = void, else a
    segment id), "segments_info": [{"id", "category_id", "isthing", "score", "area"}]}``.
    Tensors are on the CPU.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    image_size: tuple[int, int]
    masks: Tensor | None = None
    panoptic: dict | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``, plus
        ``segmentation`` (COCO RLE, counts as str) when there are masks."""
        results = to_coco_results({int(image_id): {"boxes": self.boxes, "scores": self.scores,
                                                   "labels": self.labels}})
        return self._with_segmentation(results)

    def to_records(self) -> list[dict]:
        """``{"box": [x1, y1, x2, y2], "score", "category_id", "category"}`` per detection
        (box rounded to 0.01 px, score to 1e-5), plus ``segmentation`` (COCO RLE
        ``{"size": [H, W], "counts": str}``) when there are masks."""
        records = [{"box": [round(v, 2) for v in box], "score": round(score, 5),
                    "category_id": int(label), "category": name}
                   for box, score, label, name in zip(self.boxes.tolist(), self.scores.tolist(),
                                                      self.labels.tolist(), self.names,
                                                      strict=True)]
        return self._with_segmentation(records)

    def rles(self) -> list[dict] | None:
        """The masks as COCO RLEs (row i = detection i); None without masks."""
        return None if self.masks is None else encode_masks(self.masks)

    def _with_segmentation(self, rows: list[dict]) -> list[dict]:
        rles = self.rles()
        if rles is None:
            return rows
        return [{**row, "segmentation": rle} for row, rle in zip(rows, rles, strict=True)]

    def to_json(self) -> str:
        """:meth:`to_records` as a JSON list."""
        return json.dumps(self.to_records())
