"""What each object query specialises in: its predicted boxes over a whole dataset.

The DETR paper (its figure of 20 decoder slots over COCO val) plots, for each query, the
centre of the box it predicts on every image, normalised by the image's size: each query
learns a few preferred areas and box shapes. :func:`query_boxes` gathers those boxes from the
raw, per-query predictions of an evaluation run.

Input contract: ``predictions`` as :func:`detr.engine.evaluate` returns them before any
threshold or ranking: by image id, ``boxes`` [Q, 4] absolute xyxy pixels of the original
image, ``scores`` [Q], ``labels`` [Q], row q being query q
(:class:`detr.models.postprocess.PostProcess` keeps every query, in query order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_convert


@dataclass(frozen=True)
class QueryBoxes:
    """``boxes`` [Q, N, 4]: query q's box on image n, normalised (cx, cy, w, h) in [0, 1]
    of that image; ``scores`` [Q, N]; ``labels`` [Q, N] category ids; ``image_ids`` the N
    images, sorted."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    image_ids: tuple[int, ...]

    @property
    def num_queries(self) -> int:
        return self.boxes.shape[0]


def query_boxes(predictions: Mapping[int, Mapping[str, Tensor]],
                image_sizes: Mapping[int, tuple[int, int]]) -> QueryBoxes:
    """Every query's box on every image (module doc), normalised by ``image_sizes``
    ((height, width) by image id).

    Raises:
        ValueError: no predictions, an image without a size, or images with different
            numbers of queries (thresholded or ranked predictions: pass the raw ones).
    """
    if not predictions:
        raise ValueError("query_boxes: no predictions")
    ids = sorted(int(i) for i in predictions)
    counts = {len(predictions[i]["scores"]) for i in ids}
    if len(counts) != 1:
        raise ValueError(f"query_boxes: images have {sorted(counts)} predictions each; expected "
                         f"one per query on every image (raw predictions, before thresholds)")
    boxes, scores, labels = [], [], []
    for image_id in ids:
        if image_id not in image_sizes:
            raise ValueError(f"query_boxes: no size for image {image_id}")
        height, width = image_sizes[image_id]
        det = predictions[image_id]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        xyxy = torch.as_tensor(det["boxes"]).float().cpu() / scale
        boxes.append(box_convert(xyxy, "xyxy", "cxcywh").clamp(0, 1))
        scores.append(torch.as_tensor(det["scores"]).float().cpu())
        labels.append(torch.as_tensor(det["labels"]).cpu().to(torch.int64))
    return QueryBoxes(torch.stack(boxes, 1), torch.stack(scores, 1), torch.stack(labels, 1),
                      tuple(ids))
