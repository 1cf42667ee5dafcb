"""Tiles of large images: the grid, boxes cut to a tile, tile boxes mapped back, and merging.

Pure geometry on tensors, shared by the prepare stage (a large training image becomes
overlapping tiles, its boxes clipped to each) and by tiled prediction
(:meth:`detr.inference.Predictor.predict` with ``tile=``: each tile is predicted, its boxes
are mapped back to the image and the duplicates of the overlaps merged).

Conventions: boxes are float xyxy in absolute pixels, continuous coordinates with the origin at
the image's top-left corner (a pixel column ``x`` spans ``[x, x + 1)``); a :class:`Tile` is the
pixel window ``[x0, x0 + width) x [y0, y0 + height)`` of its image, so a box in tile pixels
plus ``(x0, y0, x0, y0)`` is the same box in image pixels, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_area, box_iou, clip_boxes_to_image

Match = Literal["ios", "iou"]
_CHUNK = 1024  # candidates compared at once in merge(): 1024 x 1024 x 4 bytes per matrix
# [3, h, w] images -> per image every query's "boxes" (xyxy pixels of that image), "scores",
# "labels": one forward pass (detr.inference.Predictor's).
RawPredict = Callable[[list[Tensor]], list[dict[str, Tensor]]]


@dataclass(frozen=True)
class Tile:
    """One window of an image: its top-left corner ``(x0, y0)`` and size, in image pixels."""

    x0: int
    y0: int
    width: int
    height: int

    @property
    def offset(self) -> Tensor:
        """``[x0, y0, x0, y0]``: add it to tile boxes (xyxy) to get image boxes."""
        return torch.tensor([self.x0, self.y0, self.x0, self.y0], dtype=torch.float32)


@dataclass(frozen=True)
class TileOptions:
    """How :meth:`detr.inference.Predictor.predict` tiles an image.

    ``size``: tile side in the image's pixels (each tile is then resized like a whole image,
    short side to the predictor's scale); ``overlap``: the least fraction of a tile shared
    with its neighbour, in [0, 1); ``whole``: also predict the whole image (downscaled as
    without tiling) and merge it in, for objects larger than a tile. Merging: detections of
    one class whose ``match`` (``ios`` = intersection over the smaller box: a fragment cut by
    a tile border lies inside the whole object's box; ``iou``: torchvision's batched NMS) is
    >= ``threshold`` are one object, kept as the best-scoring one; ``fuse`` makes its box the
    score-weighted mean of the group's (weighted box fusion).
    """

    size: int
    overlap: float = 0.2
    whole: bool = False
    match: Match = "ios"
    threshold: float = 0.5
    fuse: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"tile size must be an int >= 16 px, got {self.size!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tile overlap must be in [0, 1), got {self.overlap!r}")
        if self.match not in ("ios", "iou"):
            raise ValueError(f"tile match must be 'ios' or 'iou', got {self.match!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"tile merge threshold must be in (0, 1], got {self.threshold!r}")


def axis_starts(length: int, size: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``size`` covering ``[0, length)``: ``[0]`` when it fits,
    else the fewest evenly spaced windows whose neighbours share >= ``overlap * size`` pixels,
    the first at 0 and the last ending at ``length``."""
    if length <= size:
        return [0]
    stride = max(1, math.floor(size * (1.0 - overlap)))
    count = math.ceil((length - size) / stride) + 1
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


def tile_grid(height: int, width: int, *, size: int, overlap: float) -> list[Tile]:
    """Tiles covering a ``height`` x ``width`` image, row by row; each ``size`` x ``size``
    (a side shorter than ``size`` is covered by one tile of its length). An image no larger
    than ``size`` either way is one tile, the image itself."""
    if height < 1 or width < 1:
        raise ValueError(f"tile_grid: empty image {height}x{width}")
    if size < 1 or not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile_grid: size {size} must be >= 1 and overlap {overlap} in [0, 1)")
    tile_h, tile_w = min(size, height), min(size, width)
    return [Tile(x0, y0, tile_w, tile_h)
            for y0 in axis_starts(height, size, overlap)
            for x0 in axis_starts(width, size, overlap)]


def crop_boxes(boxes: Tensor, tile: Tile, *, min_visible: float) -> tuple[Tensor, Tensor]:
    """Image boxes [N, 4] cut to ``tile``: ``(tile_boxes [M, 4], kept [M])``, the boxes in tile
    pixels clipped to it and the indices of the boxes kept: those whose visible fraction (area
    inside the tile / area) is >= ``min_visible`` and whose clipped box has a positive area."""
    boxes = (boxes if boxes.is_floating_point() else boxes.float()).reshape(-1, 4)
    inside = clip_boxes_to_image(boxes - tile.offset.to(boxes), (tile.height, tile.width))
    area = box_area(boxes)
    visible = torch.where(area > 0, box_area(inside) / area.clamp(min=1e-12), 0.0)
    wide = (inside[:, 2] > inside[:, 0]) & (inside[:, 3] > inside[:, 1])
    kept = torch.nonzero(wide & (visible >= min_visible)).flatten()
    return inside[kept], kept


def to_image(boxes: Tensor, tile: Tile) -> Tensor:
    """Tile boxes [N, 4] -> the same boxes in the image's pixels (float dtypes kept)."""
    boxes = boxes if boxes.is_floating_point() else boxes.float()
    return boxes + tile.offset.to(boxes)


def merge(boxes: Tensor, scores: Tensor, labels: Tensor, *, match: Match = "ios",
          threshold: float = 0.5, fuse: bool = False,
          limit: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Detections from overlapping tiles -> one per object: ``(boxes, scores, labels)``, best
    score first. Class-wise: boxes of one label whose ``match`` >= ``threshold`` are a group,
    kept as its best-scoring box (:class:`TileOptions`); with ``fuse`` that box is replaced
    by the score-weighted mean of its group's boxes. ``limit``: keep at most that many (the
    same first ones: greedy suppression never looks at lower scores)."""
    if len(scores) == 0:
        return boxes.reshape(0, 4).float(), scores, labels
    boxes = boxes.float()
    if match == "iou":
        keep = batched_nms(boxes, scores.float(), labels, threshold)[:limit]
    else:
        keep = _greedy_ios(boxes, scores.float(), labels, threshold, limit)
    kept_boxes = _fused(boxes, scores, labels, keep, match, threshold) if fuse else boxes[keep]
    return kept_boxes, scores[keep], labels[keep]


def intersection_over_smaller(a: Tensor, b: Tensor) -> Tensor:
    """[N, M]: intersection area / the smaller box's area (0 for empty boxes)."""
    low = torch.max(a[:, None, :2], b[None, :, :2])
    high = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    smaller = torch.min(box_area(a)[:, None], box_area(b)[None, :])
    return torch.where(smaller > 0, inter / smaller.clamp(min=1e-12), 0.0)


def _greedy_ios(boxes: Tensor, scores: Tensor, labels: Tensor, threshold: float,
                limit: int | None) -> Tensor:
    """Indices kept by greedy class-wise suppression on intersection over the smaller box, best
    first, at most ``limit``; :data:`_CHUNK` candidates at a time (memory: chunk x chunk)."""
    order = scores.argsort(descending=True, stable=True)
    limit = len(order) if limit is None else limit
    keep: list[int] = []
    for start in range(0, len(order), _CHUNK):
        chunk = order[start:start + _CHUNK]
        kept = torch.tensor(keep, dtype=torch.int64, device=order.device)
        alive = ~_close(boxes[chunk], labels[chunk], boxes[kept], labels[kept], threshold).any(1)
        close = _close(boxes[chunk], labels[chunk], boxes[chunk], labels[chunk], threshold)
        alive, close = alive.cpu().numpy(), close.cpu().numpy()
        for i, index in enumerate(chunk.tolist()):
            if alive[i]:
                keep.append(index)
                alive &= ~close[i]
                if len(keep) == limit:
                    return torch.tensor(keep, dtype=torch.int64, device=order.device)
    return torch.tensor(keep, dtype=torch.int64, device=order.device)


def _close(a: Tensor, a_labels: Tensor, b: Tensor, b_labels: Tensor, threshold: float) -> Tensor:
    """[N, M]: same label and intersection over the smaller box >= ``threshold``."""
    same = a_labels[:, None] == b_labels[None, :]
    return same & (intersection_over_smaller(a, b) >= threshold)


def _fused(boxes: Tensor, scores: Tensor, labels: Tensor, keep: Tensor, match: Match,
           threshold: float) -> Tensor:
    """Each kept box's group (same label, ``match`` >= ``threshold``), averaged by score."""
    if match == "ios":
        group = _close(boxes[keep], labels[keep], boxes, labels, threshold)
    else:
        group = box_iou(boxes[keep], boxes) >= threshold
        group &= labels[keep][:, None] == labels[None, :]
    weights = group.float() * scores.float()[None, :]
    return weights @ boxes / weights.sum(1, keepdim=True).clamp(min=1e-12)


def predict_tiles(raw: RawPredict, pixels: Tensor, tile: TileOptions, *,
                  score_threshold: float = 0.0, batch_size: int = 8,
                  limit: int | None = None) -> dict[str, Tensor]:
    """One [3, H, W] image predicted tile by tile with ``raw``, ``batch_size`` tiles a call
    (plus the whole image with ``tile.whole``): ``{"boxes", "scores", "labels"}`` on the CPU,
    boxes in the image's pixels, scores >= ``score_threshold`` (applied before merging: a box
    under it suppresses nothing), merged across tiles by :func:`merge` (at most ``limit``),
    best first. An image that fits in one tile is predicted whole, unmerged."""
    height, width = pixels.shape[-2:]
    tiles = tile_grid(height, width, size=tile.size, overlap=tile.overlap)
    if len(tiles) == 1:
        return _on_cpu(raw([pixels])[0])
    found = []
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start:start + batch_size]
        crops = [pixels[:, t.y0:t.y0 + t.height, t.x0:t.x0 + t.width] for t in chunk]
        for det, t in zip(raw(crops), chunk, strict=True):
            det = _on_cpu(det)
            boxes = clip_boxes_to_image(det["boxes"], (t.height, t.width))
            found.append({**det, "boxes": to_image(boxes, t)})
    if tile.whole:
        found.append(_on_cpu(raw([pixels])[0]))
    cat = {key: torch.cat([f[key] for f in found]) for key in ("boxes", "scores", "labels")}
    keep = cat["scores"] >= score_threshold
    boxes, scores, labels = merge(cat["boxes"][keep], cat["scores"][keep], cat["labels"][keep],
                                  match=tile.match, threshold=tile.threshold, fuse=tile.fuse,
                                  limit=limit)
    return {"boxes": boxes, "scores": scores, "labels": labels}


def _on_cpu(det: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"boxes": det["boxes"].float().cpu(), "scores": det["scores"].float().cpu(),
            "labels": det["labels"].cpu().to(torch.int64)}
