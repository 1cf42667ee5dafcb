"""Bipartite (Hungarian) matching between predictions and ground-truth boxes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]  # per image: (query indices, target indices), int64


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    ``cost_class * -p(class) + cost_bbox * L1(cxcywh) + cost_giou * -GIoU``.

    Targets: dicts with ``labels`` [N] int64 and ``boxes`` [N, 4] normalised cxcywh.
    The cost matrix of the whole batch (and of every decoder layer, in :meth:`match_layers`) is
    computed in one go and copied to the CPU once; scipy solves each image.
    """

    def __init__(self, *, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[dict]) -> Indices:
        """``outputs`` with ``pred_logits`` [B,Q,C+1] and ``pred_boxes`` [B,Q,4] -> indices."""
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers: Sequence[dict], targets: Sequence[dict]) -> list[Indices]:
        """Match each of ``layers`` (outputs of one decoder layer each) to the same targets."""
        logits = torch.stack([o["pred_logits"] for o in layers])  # [L, B, Q, C+1]
        boxes = torch.stack([o["pred_boxes"] for o in layers])  # [L, B, Q, 4]
        num_layers, batch, queries = logits.shape[:3]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [[(empty, empty) for _ in range(batch)] for _ in range(num_layers)]
        cost = self._cost(logits.flatten(0, 2), boxes.flatten(0, 2), targets)
        cost = cost.view(num_layers, batch, queries, -1).cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError("matcher: the cost matrix has NaN/inf (predictions diverged)")
        per_image = cost.split(sizes, dim=-1)
        return [[_assign(per_image[b][lay, b]) for b in range(batch)]
                for lay in range(num_layers)]

    def _cost(self, logits: Tensor, boxes: Tensor, targets: Sequence[dict]) -> Tensor:
        """[P, C+1], [P, 4] against all targets of the batch -> [P, T] cost."""
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        prob = logits.float().softmax(-1)
        boxes = boxes.float()
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                   box_convert(tgt_boxes, "cxcywh", "xyxy"))
        return (self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
                - self.cost_class * prob[:, tgt_ids]
                - self.cost_giou * giou)


def _assign(cost: Tensor) -> tuple[Tensor, Tensor]:
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
