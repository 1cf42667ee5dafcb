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

Panoptic maps (:func:`panoptic_for`): the paper's, from
:func:`detr.models.mask_postprocess.panoptic_segments`: the queries scoring over a threshold
compete for every pixel (the highest mask logit wins), the segments of one *stuff* category
merge, segments under ``min_area`` pixels are dropped. Output per image: ``{"segments": int32
[H, W], "segments_info": [{"id", "category_id", "isthing", "score", "area"}]}``.

:func:`segment_batch`: what the evaluation adds to each image's detections (every query's
mask as COCO RLE, the panoptic map).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from pycocotools import mask as coco_mask
from torch import Tensor, nn

from detr.models.mask_postprocess import mask_logits_at_size, panoptic_segments
from detr.models.segmentation import MASK_STRIDE
from detr.segm_evaluation import encode_masks

CHUNK = 16  # masks upsampled per step: [16, H, W] float at a time
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
    for start in range(0, len(keep), chunk):
        yield mask_logits_at_size(pred_masks[keep[start:start + chunk]], size, orig_size)


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
def panoptic_for(outputs: dict, sizes: Sequence[Sequence[int]],
                 orig_sizes: Sequence[Sequence[int]], *, threshold: float,
                 stuff_ids: Iterable[int] = (), label_to_category: Sequence[int] | None = None,
                 min_area: int = MIN_AREA) -> list[dict]:
    """Panoptic maps, one per image, as the paper makes them
    (:func:`detr.models.mask_postprocess.panoptic_segments`): the queries scoring over
    ``threshold`` compete for the pixels. ``stuff_ids``: category ids of the stuff classes
    (``isthing`` 0); ``label_to_category``: the category id of each label (None: labels are
    the ids)."""
    is_thing = {int(c): False for c in stuff_ids}  # a missing id is a thing
    return [panoptic_segments(logits, pred, size, orig, is_thing=is_thing,
                              label_to_category=label_to_category, threshold=threshold,
                              min_area=min_area)
            for logits, pred, size, orig in zip(outputs["pred_logits"], outputs["pred_masks"],
                                                sizes, orig_sizes, strict=True)]


@dataclass(frozen=True)
class MaskOutputs:
    """What :func:`segment_batch` adds to each image's detections: ``masks`` (every query's,
    as COCO RLE) and, with ``panoptic``, the panoptic map of the queries scoring over
    ``threshold``; ``stuff_ids``: the stuff classes' category ids."""

    panoptic: bool = False
    threshold: float = 0.5
    stuff_ids: frozenset[int] = frozenset()


def segment_batch(outputs: dict, targets: Sequence[dict], spec: MaskOutputs,
                  label_to_category: Sequence[int] | None) -> list[dict]:
    """One batch of a segmentation model -> per image ``{"masks": [RLE of every query, in
    query order], "panoptic"?: {...}}`` at the image's ``orig_size`` (``targets``: ``size``
    the resized input, ``orig_size``). Masks are made a few at a time and encoded at once,
    so memory stays at a few masks of the original size."""
    sizes = [t["size"].tolist() for t in targets]
    origs = [t["orig_size"].tolist() for t in targets]
    found = []
    for pred, size, orig in zip(outputs["pred_masks"], sizes, origs, strict=True):
        every = torch.arange(len(pred), device=pred.device)
        found.append({"masks": [rle for logits in mask_logit_chunks(pred, every, size, orig)
                                for rle in encode_masks(logits > 0)]})
    if spec.panoptic:
        maps = panoptic_for(outputs, sizes, origs, threshold=spec.threshold,
                            stuff_ids=spec.stuff_ids, label_to_category=label_to_category)
        for item, panoptic in zip(found, maps, strict=True):
            item["panoptic"] = {"segments": panoptic["segments"].cpu(),
                                "segments_info": panoptic["segments_info"]}
    return found


def rle_decode(rle: dict) -> Tensor:
    """A COCO RLE (counts as str or bytes) -> bool [H, W]."""
    counts = rle["counts"]
    raw = {"size": list(rle["size"]),
           "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return torch.from_numpy(coco_mask.decode(raw).astype(bool))
