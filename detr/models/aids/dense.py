"""The dense auxiliary head (``model.aids.dense``): one-to-many supervision of the encoder.

In the spirit of Co-DETR / H-DETR, training only: every encoder token is classified as the
smallest ground-truth box that contains its centre (and the token under each box centre as
that box, however small), else "no object" (``dense_embed``). With ``boxes`` each token
assigned to a box also regresses it as the distances from its centre to the box's four sides
(``dense_bbox_embed``, FCOS-style). It supervises the backbone and encoder per location from
the first step; inference never uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss

from detr.config import DenseConfig
from detr.distributed import mean_over_processes
from detr.models.aids.base import TrainingAid
from detr.models.mlp import MLP


class DenseHead(TrainingAid):
    """Adds ``outputs["dense"]``: ``pred_logits`` [B, h*w, num_classes + 1] of every encoder
    token and the feature padding ``mask`` [B, h, w]; with ``boxes`` also ``pred_ltrb``
    [B, h*w, 4] in (0, 1): each token's distances to the left, top, right and bottom sides of
    its box, as fractions of the image's size. Losses: see :meth:`losses`. With multi-scale
    features the tokens of all levels are concatenated (N = sum of h_l * w_l, finest first)
    and ``mask`` is the list of the levels' masks; each level is assigned on its own."""

    name = "dense"
    parts = ("dense_embed", "dense_bbox_embed")
    class_sized = ("dense_embed.",)

    def __init__(self, cfg: DenseConfig, *, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.loss_coef = cfg.loss_coef
        self.dense_embed = nn.Linear(dim, num_classes + 1)
        self.dense_bbox_embed = MLP(dim, dim, 4, 3) if cfg.boxes else None

    def outputs(self, queries, hs, memory, mask, heads) -> dict:
        levels = memory if isinstance(memory, list) else [memory]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in levels], 1)
        dense = {"pred_logits": self.dense_embed(tokens), "mask": mask}
        if self.dense_bbox_embed is not None:
            dense["pred_ltrb"] = self.dense_bbox_embed(tokens).sigmoid()
        return {"dense": dense}

    def losses(self, outputs: dict, targets: Sequence[dict], *, num_boxes: Tensor,
               empty_weight: Tensor) -> dict[str, Tensor]:
        """``loss_ce_dense``: cross-entropy of every real encoder token against
        :func:`dense_targets`, the no-object class weighted as ``empty_weight`` says, as a
        weighted mean. With ``pred_ltrb``: ``loss_bbox_dense`` and ``loss_giou_dense``, L1
        (cxcywh) and 1 - GIoU of each assigned token's box (its centre minus/plus the predicted
        distances) against its target box, averaged over the assigned tokens."""
        if "dense" not in outputs:
            return {}
        dense = outputs["dense"]
        logits, masks = dense["pred_logits"].float(), _levels(dense["mask"])
        assigned = torch.stack([  # [B, N]: each level assigned on its own
            torch.cat([dense_assignment(t["boxes"].to(logits.device), ~m[i]) for m in masks])
            for i, t in enumerate(targets)])
        classes = torch.stack([_labels_of(a, t["labels"].to(logits.device), self.num_classes)
                               for a, t in zip(assigned, targets, strict=True)])
        weights = empty_weight[classes] * torch.cat([~m.flatten(1) for m in masks], 1)
        ce = F.cross_entropy(logits.flatten(0, 1), classes.flatten(), reduction="none")
        total = mean_over_processes(weights.sum().detach()).clamp(min=1)
        out = {"loss_ce_dense": (ce * weights.flatten()).sum() / total}
        if "pred_ltrb" in dense:
            out.update(_box_losses(dense["pred_ltrb"].float(), masks, assigned, targets))
        return out

    def loss_weights(self, matched: dict[str, float]) -> dict[str, float]:
        return {"loss_ce_dense": self.loss_coef, "loss_bbox_dense": matched["loss_bbox"],
                "loss_giou_dense": matched["loss_giou"]}


def _levels(mask: Tensor | list[Tensor]) -> list[Tensor]:
    """The padding masks [B, h_l, w_l] of the levels (one map, or multi-scale's list)."""
    return mask if isinstance(mask, list) else [mask]


def _box_losses(ltrb: Tensor, masks: list[Tensor], assigned: Tensor,
                targets: Sequence[dict]) -> dict[str, Tensor]:
    """L1 and GIoU of the assigned tokens' boxes (``ltrb`` [B, N, 4] distances; ``masks``
    the levels' padding masks)."""
    image, token = (assigned >= 0).nonzero(as_tuple=True)
    centres = torch.stack([torch.cat([torch.stack(cell_centres(~m[i]), -1) for m in masks])
                           for i in range(len(targets))])  # [B, N, 2]
    c, d = centres[image, token], ltrb[image, token]
    src = torch.cat([c - d[:, :2], c + d[:, 2:]], -1)  # xyxy
    offsets = torch.tensor([0] + [len(t["labels"]) for t in targets]).cumsum(0)
    tgt_cxcywh = torch.cat([t["boxes"] for t in targets]).to(ltrb)
    tgt_cxcywh = tgt_cxcywh[assigned[image, token] + offsets[image.cpu()].to(ltrb.device)]
    num = mean_over_processes(ltrb.new_tensor(float(len(image)))).clamp(min=1)
    return {"loss_bbox_dense": F.l1_loss(box_convert(src, "xyxy", "cxcywh"), tgt_cxcywh,
                                         reduction="sum") / num,
            "loss_giou_dense": generalized_box_iou_loss(
                src, box_convert(tgt_cxcywh, "cxcywh", "xyxy"), reduction="sum") / num}


def dense_targets(boxes: Tensor, labels: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    """Class of each cell of a feature map: [h * w] int64.

    ``boxes`` [N, 4] normalised cxcywh and ``labels`` [N] of one image; ``valid`` [h, w] bool,
    True on the image (padding at the bottom/right). A cell takes the label of its box in
    :func:`dense_assignment`; every other cell (and the padding) is ``num_classes``, no object.
    """
    return _labels_of(dense_assignment(boxes, valid), labels, num_classes)


def _labels_of(box: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Box index per cell (-1: none) -> that box's label (``num_classes``: no object)."""
    if len(labels) == 0:
        return torch.full_like(box, num_classes)
    return torch.where(box >= 0, labels[box.clamp(min=0)], num_classes)


def dense_assignment(boxes: Tensor, valid: Tensor) -> Tensor:
    """Box of each cell of a feature map: [h * w] int64 index into ``boxes``, -1 for none.

    A cell takes the smallest box that contains its centre; the cell under each box's centre
    takes that box even when the box is smaller than a cell. Padding cells take none.
    """
    h, w = valid.shape
    if len(boxes) == 0:
        return torch.full((h * w,), -1, dtype=torch.int64, device=boxes.device)
    cx, cy = cell_centres(valid)
    x0, y0, x1, y1 = box_convert(boxes.float(), "cxcywh", "xyxy").unbind(-1)
    inside = (cx[:, None] > x0) & (cx[:, None] < x1) & (cy[:, None] > y0) & (cy[:, None] < y1)
    rows, cols = valid[:, 0].sum(), valid[0].sum()  # the image's extent in cells
    centre_row = (boxes[:, 1] * rows).long().clamp(0, int(rows) - 1)
    centre_col = (boxes[:, 0] * cols).long().clamp(0, int(cols) - 1)
    inside[centre_row * w + centre_col, torch.arange(len(boxes), device=boxes.device)] = True
    area = torch.where(inside, (boxes[:, 2] * boxes[:, 3]).float()[None], torch.inf)
    return torch.where(inside.any(1), area.argmin(1), -1)


def cell_centres(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Centres (x, y) of the [h, w] cells of a feature map, each [h * w], normalised to the
    image's extent in cells (``valid``'s True part, at the top left)."""
    h, w = valid.shape
    rows, cols = valid[:, 0].sum(), valid[0].sum()
    cy = (torch.arange(h, device=valid.device) + 0.5) / rows
    cx = (torch.arange(w, device=valid.device) + 0.5) / cols
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")
    return cx.flatten(), cy.flatten()
