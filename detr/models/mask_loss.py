"""The mask losses of the segmentation model: sigmoid focal + DICE on the matched queries' masks.

Resolution stays bounded: the predictions are never upsampled to the image size; each target
mask is brought down to the prediction grid instead (stride 4 of the padded batch, each cell
the fraction of its 4 x 4 pixels inside the object), so memory grows with the number of
matched masks times the grid, not with the number of queries times the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

from detr.models.matcher import Indices
from detr.models.segmentation import MASK_STRIDE

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # the official (RetinaNet's) values


def mask_losses(outputs: dict, targets: Sequence[dict], indices: Indices,
                num_boxes: Tensor) -> dict[str, Tensor]:
    """``loss_mask`` (sigmoid focal, the mean over each mask's cells) and ``loss_dice``, both
    summed over the matched pairs and divided by ``num_boxes`` (as the box losses).

    Args:
        outputs: the model's, with ``pred_masks`` [B, Q, h, w] mask logits at stride 4 of the
            padded batch, or ``query_masks`` (:class:`~detr.models.segmentation.QueryMasks`:
            then only the matched queries' masks are computed).
        targets: per image ``masks`` bool [N, H_i, W_i] in the image's own (unpadded) pixels
            of the model input, row i = box i.
        indices: per image (query indices, target indices) of the last decoder layer.
        num_boxes: the number of target boxes (DDP-averaged, >= 1).

    Only an image's own cells count (its padding is no object's and nothing's). No match
    (empty targets) gives zeros that still reach the mask head (DDP needs a gradient).
    """
    pred = outputs.get("pred_masks")
    grid = pred.shape[-2:] if pred is not None else outputs["query_masks"].grid
    images, queries, cells, inside = [], [], [], []
    for b, (rows_q, rows_t) in enumerate(indices):
        if len(rows_q) == 0:
            continue
        if "masks" not in targets[b]:
            raise ValueError(f"target {b} has no 'masks': the segmentation model's loss needs "
                             f"them (load the dataset with masks for model.task "
                             f"segmentation / panoptic)")
        masks = targets[b]["masks"]
        target_cells, target_inside = masks_on_grid(masks[rows_t.to(masks.device)], grid)
        images.append(torch.full_like(rows_q, b))
        queries.append(rows_q)
        cells.append(target_cells)
        inside.append(target_inside.expand_as(target_cells))
    if not images:
        zero = pred.sum() * 0.0 if pred is not None else outputs["query_masks"].zero()
        return {"loss_mask": zero, "loss_dice": zero}
    device = (pred if pred is not None else outputs["query_masks"].inputs.src).device
    images, queries = torch.cat(images).to(device), torch.cat(queries).to(device)
    logits = pred[images, queries] if pred is not None else outputs["query_masks"](images,
                                                                                     queries)
    logits = logits.float().flatten(1)
    target = torch.cat(cells).to(logits).flatten(1)
    weight = torch.cat(inside).to(logits).flatten(1)
    focal = sigmoid_focal_loss(logits, target, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA,
                               reduction="none")
    focal = (focal * weight).sum(1) / weight.sum(1)
    return {"loss_mask": focal.sum() / num_boxes,
            "loss_dice": dice_loss(logits, target, weight).sum() / num_boxes}


def dice_loss(logits: Tensor, targets: Tensor, weight: Tensor) -> Tensor:
    """1 - DICE of ``sigmoid(logits)`` with ``targets`` (in [0, 1]), each row [P, n] one mask,
    counting the cells where ``weight`` is 1 -> [P]. The +1 smoothing is the official one."""
    prob = logits.sigmoid() * weight
    targets = targets * weight
    return 1 - (2 * (prob * targets).sum(1) + 1) / (prob.sum(1) + targets.sum(1) + 1)


def masks_on_grid(masks: Tensor, grid: Sequence[int],
                  stride: int = MASK_STRIDE) -> tuple[Tensor, Tensor]:
    """Masks [N, H, W] (bool, unpadded image pixels) -> ``(cells, inside)``: ``cells``
    [N, h, w] float, the fraction of each ``stride`` x ``stride`` block covered (cell (i, j)
    = pixels [i*s, (i+1)*s) x [j*s, (j+1)*s)), zero beyond the image; ``inside`` [1, h, w]
    bool, True on the image's own cells. ``grid`` = (h, w), the prediction grid."""
    n, height, width = masks.shape
    rows, cols = -(-height // stride), -(-width // stride)
    h, w = int(grid[0]), int(grid[1])
    if rows > h or cols > w:
        raise ValueError(f"target masks of {height}x{width} px need a {rows}x{cols} grid at "
                         f"stride {stride}, the predictions have {h}x{w}: target['masks'] must "
                         f"be in the model input's pixels (after the transforms)")
    padded = F.pad(masks.float()[:, None], (0, cols * stride - width, 0, rows * stride - height))
    cells = masks.new_zeros((n, h, w), dtype=torch.float32)
    cells[:, :rows, :cols] = F.avg_pool2d(padded, stride)[:, 0]
    inside = torch.zeros((1, h, w), dtype=torch.bool, device=masks.device)
    inside[:, :rows, :cols] = True
    return cells, inside
