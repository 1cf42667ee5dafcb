"""Mask logits of a segmentation DETR -> instance masks, panoptic maps and COCO RLE.

Model contract: a segmentation model returns DETR's outputs plus ``pred_masks`` [B, Q, h, w]
float logits on a stride-4 grid of the *padded* batch (``h = ceil(H / 4)`` of the padded
height ``H``, or more), each image at the top left of the batch. A model has a mask head
when it has a ``mask_head`` submodule (the official key prefix ``mask_head.``):
:func:`has_mask_head`.

Instance masks (:func:`masks_for`): the cells of the image's own (unpadded) region of the kept
queries' logits (cell (i, j) covers input pixels [4i, 4i+4) x [4j, 4j+4)) are resampled
(bilinear) in one step straight to the original image size, at the true scale (original
pixels per cell), and thresholded at sigmoid > 0.5 (logit > 0). Masks are computed a few
queries at a time, so memory stays bounded for large images.

Panoptic maps (:func:`panoptic_for`): each pixel goes to the kept detection with the highest
mask logit there, among those whose mask covers it (logit > 0; no cover: void, id 0); the
segments of one *stuff* category merge into one (score = their best); a segment smaller than
``min_area`` pixels becomes void. Segment ids are 1..K in order of score. Output per image:
``{"segments": int32 [H, W], "segments_info": [{"id", "category_id", "isthing", "score",
"area"}]}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from pycocotools import mask as coco_mask
from torch import Tensor, nn
from torch.nn import functional as F

MASK_STRIDE = 4  # pixels of the padded input per cell of ``pred_masks``
CHUNK = 16  # masks upsampled per step: [16, H, W] float at a time
_NUDGE = 1 + 1e-9
MIN_AREA = 4  # px: smaller panoptic segments become void (as the official postprocess)


def has_mask_head(model: nn.Module) -> bool:
    """Whether ``model`` is a segmentation DETR (it has a ``mask_head`` submodule)."""
    return isinstance(getattr(model, "mask_head", None), nn.Module)


def mask_logit_chunks(pred_masks: Tensor, keep: Tensor, size: Sequence[int],
                      orig_size: Sequence[int], *, chunk: int = CHUNK) -> Iterator[Tensor]:
    """One image's ``pred_masks`` [Q, h, w] -> float logits [n, H, W] at ``orig_size`` of the
    queries ``keep`` (in that order), ``chunk`` queries at a time. ``size``: the image's
    unpadded input size (height, width), inside the stride-4 grid.

    Raises:
        ValueError: the grid is smaller than ``size`` / 4 (not the padded batch's grid).
    """
    height, width = (int(v) for v in size)
    rows, cols = -(-height // MASK_STRIDE), -(-width // MASK_STRIDE)
    grid = pred_masks.shape[-2:]
    if grid[0] < rows or grid[1] < cols:
        raise ValueError(f"pred_masks grid {tuple(grid)} does not cover the input size "
                         f"{height} x {width} at stride {MASK_STRIDE}")
    orig_h, orig_w = (int(v) for v in orig_size)
    # The true scale, nudged up by 1e-9: interpolate's output size is floor(cells * scale),
    # which float rounding can make one pixel short of the original size.
    scale = (MASK_STRIDE * orig_h / height * _NUDGE, MASK_STRIDE * orig_w / width * _NUDGE)
    for start in range(0, len(keep), chunk):
        cells = pred_masks[keep[start:start + chunk], :rows, :cols].float()[:, None]
        out = F.interpolate(cells, scale_factor=scale, mode="bilinear", align_corners=False,
                            recompute_scale_factor=False)  # the last cells may reach past
        yield out[:, 0, :orig_h, :orig_w]


@torch.inference_mode()
def masks_for(outputs: dict, keep_indices: Sequence[Tensor], sizes: Sequence[Sequence[int]],
              orig_sizes: Sequence[Sequence[int]]) -> list[Tensor]:
    """Instance masks (module doc): per image, bool [N, H, W] at ``orig_sizes[i]``, row j =
    query ``keep_indices[i][j]``. ``sizes``: each image's unpadded input size."""
    masks = []
    for pred, keep, size, orig in zip(outputs["pred_masks"], keep_indices, sizes, orig_sizes,
                                      strict=True):
        parts = [logits > 0 for logits in mask_logit_chunks(pred, keep, size, orig)]
        empty = torch.zeros((0, *(int(v) for v in orig)), dtype=torch.bool, device=pred.device)
        masks.append(torch.cat(parts) if parts else empty)
    return masks


@torch.inference_mode()
def panoptic_for(outputs: dict, keep_indices: Sequence[Tensor], sizes: Sequence[Sequence[int]],
                 orig_sizes: Sequence[Sequence[int]], labels: Sequence[Tensor],
                 scores: Sequence[Tensor], *, stuff_ids: Iterable[int] = (),
                 min_area: int = MIN_AREA) -> list[dict]:
    """Panoptic maps (module doc), one per image, of the kept queries ``keep_indices[i]``
    whose category ids are ``labels[i]`` and scores ``scores[i]`` (best first).
    ``stuff_ids``: the category ids that are stuff (``isthing`` 0); others are things."""
    stuff = {int(c) for c in stuff_ids}
    maps = []
    for pred, keep, size, orig, lab, score in zip(outputs["pred_masks"], keep_indices, sizes,
                                                  orig_sizes, labels, scores, strict=True):
        owner = _owners(mask_logit_chunks(pred, keep, size, orig), orig, pred.device)
        maps.append(_segments(owner.cpu(), lab.cpu().tolist(), score.cpu().tolist(), stuff,
                              min_area))
    return maps


def _owners(chunks: Iterable[Tensor], orig_size: Sequence[int], device) -> Tensor:
    """int64 [H, W]: index of the detection with the highest positive logit, -1 for none."""
    best = torch.zeros([int(v) for v in orig_size], device=device)
    owner = torch.full_like(best, -1, dtype=torch.int64)
    offset = 0
    for logits in chunks:
        value, index = logits.max(dim=0)
        better = value > best
        best = torch.where(better, value, best)
        owner = torch.where(better, index + offset, owner)
        offset += len(logits)
    return owner


def _segments(owner: Tensor, labels: list[int], scores: list[float], stuff: set[int],
              min_area: int) -> dict:
    """Detections' pixels (``owner``) -> segment map and info; stuff merged per category."""
    keys: list[tuple] = []  # segment key of each detection: ("stuff", cat) or ("thing", j)
    for j, category in enumerate(labels):
        keys.append(("stuff", category) if category in stuff else ("thing", j))
    order = list(dict.fromkeys(keys))  # first seen = best score first
    segment_of = torch.tensor([order.index(k) for k in keys] + [-1], dtype=torch.int64)
    index = segment_of[owner]  # owner -1 picks the trailing -1
    areas = torch.bincount(index[index >= 0], minlength=len(order)).tolist()
    segments = torch.zeros(owner.shape, dtype=torch.int32)
    info = []
    for k, key in enumerate(order):
        if areas[k] < max(min_area, 1):
            continue
        seg_id = len(info) + 1
        segments[index == k] = seg_id
        members = [j for j, other in enumerate(keys) if other == key]
        info.append({"id": seg_id, "category_id": int(labels[members[0]]),
                     "isthing": int(key[0] == "thing"),
                     "score": float(max(scores[j] for j in members)), "area": int(areas[k])})
    return {"segments": segments, "segments_info": info}


def rle_encode(masks: Tensor) -> list[dict]:
    """bool [N, H, W] -> N COCO RLEs ``{"size": [H, W], "counts": str}`` (pycocotools'
    compressed form, as COCO results and annotations carry it)."""
    if len(masks) == 0:
        return []
    fortran = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    encoded = coco_mask.encode(fortran)
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
            for rle in encoded]


def rle_decode(rle: dict) -> Tensor:
    """A COCO RLE (counts as str or bytes) -> bool [H, W]."""
    counts = rle["counts"]
    raw = {"size": list(rle["size"]),
           "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return torch.from_numpy(coco_mask.decode(raw).astype(bool))
