"""The segmentation model's masks -> instance masks and panoptic maps at the original image size.

Pure functions of one image's outputs, for the Predictor. ``pred_masks`` cells are at stride 4
of the padded batch (cell (i, j) covers input pixels [4i, 4i+4) x [4j, 4j+4)); only the cells
of the image's own (unpadded) region are read, and they are resampled straight to the
original image size, so the memory is the kept masks at that size, not the queries' at the
padded input's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from detr.models.segmentation import MASK_STRIDE

_NUDGE = 1 + 1e-6


def mask_logits_at_size(mask_logits: Tensor, input_size: Sequence[int],
                        orig_size: Sequence[int]) -> Tensor:
    """Mask logits [N, h, w] (rows of one image's ``pred_masks``) -> [N, H, W] float logits
    at the original image size ``orig_size`` (H, W), bilinear. ``input_size`` (H_in, W_in):
    the image's size in the model's input (after resizing, without the batch's padding)."""
    (h_in, w_in), (height, width) = (int(s) for s in input_size), (int(s) for s in orig_size)
    rows, cols = -(-h_in // MASK_STRIDE), -(-w_in // MASK_STRIDE)
    if len(mask_logits) == 0:
        return mask_logits.new_zeros((0, height, width), dtype=torch.float32)
    cells = mask_logits[:, :rows, :cols].float()[:, None]
    # One resampling with the true scale (output pixels per cell), then the image's part:
    # the last row/column of cells may reach past the image. The scale is nudged up by 1e-6
    # (a thousandth of a pixel over 1000 px) so that rounding never leaves the output short.
    scale = (MASK_STRIDE * height / h_in * _NUDGE, MASK_STRIDE * width / w_in * _NUDGE)
    out = F.interpolate(cells, scale_factor=scale, mode="bilinear", align_corners=False,
                        recompute_scale_factor=False)
    return out[:, 0, :height, :width]


def instance_masks(mask_logits: Tensor, input_size: Sequence[int], orig_size: Sequence[int],
                   *, threshold: float = 0.5) -> Tensor:
    """Masks of kept detections: ``mask_logits`` [N, h, w] (``pred_masks[b, keep]``) ->
    bool [N, H, W] at the original image size, True where sigmoid(logit) > ``threshold``.
    Sizes as :func:`mask_logits_at_size`."""
    return mask_logits_at_size(mask_logits, input_size, orig_size).sigmoid() > threshold


def panoptic_segments(logits: Tensor, mask_logits: Tensor, input_size: Sequence[int],
                      orig_size: Sequence[int], *, is_thing: Mapping[int, bool] | None = None,
                      label_to_category: Sequence[int] | None = None, threshold: float = 0.85,
                      min_area: int = 4, mask_threshold: float | None = None) -> dict:
    """One image's panoptic map, as the paper: the queries whose most likely class is not
    "no object" and whose score exceeds ``threshold`` compete for every pixel, which goes to
    the highest mask logit; queries of the same stuff category form one segment; segments of
    ``min_area`` pixels or fewer are dropped and their pixels re-assigned, until none is left.

    Args:
        logits: [Q, C+1] class logits (``pred_logits[b]``); mask_logits: [Q, h, w]
            (``pred_masks[b]``). ``input_size``, ``orig_size``: see :func:`mask_logits_at_size`.
        is_thing: category id -> thing (True) or stuff (False); a missing id is a thing.
        label_to_category: category id of each label (None: labels are category ids).
        mask_threshold: None (the paper: every pixel goes to a segment when any query is
            kept) or a probability: pixels whose winning mask is not above it stay void.

    Returns:
        ``{"segments": int32 [H, W] (0 = void, else a segment id 1..S), "segments_info":
        [{"id", "category_id", "isthing" (1 / 0), "score", "area"}, ...]}`` in id order;
        ``score`` of a stuff segment is its best query's.
    """
    scores, labels = logits.float().softmax(-1).max(-1)
    keep = (labels != logits.shape[-1] - 1) & (scores > threshold)
    queries = keep.nonzero()[:, 0]
    categories = [int(label_to_category[c]) if label_to_category is not None else int(c)
                  for c in labels[queries].tolist()]
    things = [bool((is_thing or {}).get(c, True)) for c in categories]
    segment_of = _segment_of_queries(categories, things)
    masks = mask_logits_at_size(mask_logits[queries], input_size, orig_size)
    device = masks.device
    alive = torch.ones(len(queries), dtype=torch.bool, device=device)
    segments = torch.as_tensor(segment_of, dtype=torch.int64, device=device)
    while True:
        pixels = _assign_pixels(masks, alive, segments, mask_threshold)
        area = torch.bincount(pixels.flatten(), minlength=max(segment_of, default=0) + 1)
        small = area[segments] <= min_area
        if not (small & alive).any():
            break
        alive &= ~small
    return _renumber(pixels, area, segment_of, alive, categories, things, scores[queries])


def _segment_of_queries(categories: list[int], things: list[bool]) -> list[int]:
    """Segment id (1, 2 ...) of each kept query: one each, but one per stuff category."""
    segment_of, stuff = [], {}
    for category, thing in zip(categories, things, strict=True):
        if thing:
            segment_of.append(len(set(segment_of)) + 1)
        else:
            if category not in stuff:
                stuff[category] = len(set(segment_of)) + 1
            segment_of.append(stuff[category])
    return segment_of


def _assign_pixels(masks: Tensor, alive: Tensor, segment_of: Tensor,
                   mask_threshold: float | None) -> Tensor:
    """[K, H, W] logits of the kept queries -> [H, W] int64 segment id of the best living
    query per pixel (0: none, or its mask not above ``mask_threshold``)."""
    if not alive.any():
        return torch.zeros(masks.shape[1:], dtype=torch.int64, device=masks.device)
    best, winner = masks[alive].max(0)
    pixels = segment_of[alive][winner]
    if mask_threshold is not None:
        pixels = torch.where(best.sigmoid() > mask_threshold, pixels, 0)
    return pixels


def _renumber(pixels: Tensor, area: Tensor, segment_of: list[int], alive: Tensor,
              categories: list[int], things: list[bool], scores: Tensor) -> dict:
    """Segments that kept pixels, renumbered 1..S, with their info (see panoptic_segments)."""
    info: dict[int, dict] = {}  # old segment id -> its entry
    alive, area = alive.tolist(), area.tolist()
    for q, segment in enumerate(segment_of):
        if not alive[q] or area[segment] == 0:
            continue
        if segment in info:  # another query of the same stuff segment
            info[segment]["score"] = max(info[segment]["score"], float(scores[q]))
        else:
            info[segment] = {"id": len(info) + 1, "category_id": categories[q],
                             "isthing": int(things[q]), "score": float(scores[q]),
                             "area": area[segment]}
    new_id = torch.zeros(len(area), dtype=torch.int32, device=pixels.device)
    for segment, entry in info.items():
        new_id[segment] = entry["id"]
    return {"segments": new_id[pixels], "segments_info": list(info.values())}
