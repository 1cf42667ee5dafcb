"""Denoising training (DN-DETR, Li et al. 2022) for plain DETR: training-only queries.

Besides its learned object queries, the decoder gets ``groups`` copies of the ground truth with
noise: each box shifted by up to ``box_noise / 2`` of its size and rescaled by up to
``box_noise``, its label swapped for a random one with probability ``label_noise``. A denoising
query's position is an MLP of the noisy box's sine encoding, its content the (noisy) label's
embedding (or nothing, with ``labels=False``). Its target is the ground-truth object it was made
from, so it needs no Hungarian matching: the decoder gets a stable, well-localised training
signal from the first step, which is what DETR's one-to-one matching lacks early on.

Attention: the object queries never see the denoising queries (inference has none), and each
denoising group sees itself and the first group of object queries only. Padding slots (images
with fewer boxes than the batch's most) are hidden from every query and carry no loss.
Inference and exported models never build these queries; the extra parameters
(``dn_pos_embed``, ``dn_label_embed``) exist only when denoising is on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert


@dataclass
class DenoisingBatch:
    """The denoising queries of one batch.

    ``query_pos``/``content`` [B, G*M, d]; ``labels`` [B, G*M] (ground truth; -1 on padding);
    ``boxes`` [B, G*M, 4] ground-truth cxcywh; ``valid`` [B, G*M]; G groups of M slots.
    """

    query_pos: Tensor
    content: Tensor
    labels: Tensor
    boxes: Tensor
    valid: Tensor
    groups: int
    slots: int


def box_sine_embedding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """[..., 4] normalised cxcywh -> [..., dim]: ``dim / 4`` sine/cosine channels per coordinate
    (the same frequencies as the feature map's sine encoding)."""
    if dim % 8:
        raise ValueError(f"denoising needs model.hidden_dim divisible by 8, got {dim}")
    per = dim // 4
    i = torch.arange(per, dtype=torch.float32, device=boxes.device)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / per)
    x = boxes.float()[..., None] * (2 * math.pi) / freq  # [..., 4, per]
    emb = torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)
    return emb.flatten(-2)


class Denoiser(nn.Module):
    """Builds :class:`DenoisingBatch` from targets (``labels`` [N], ``boxes`` [N, 4] cxcywh)."""

    def __init__(self, num_classes: int, dim: int, *, groups: int, box_noise: float = 0.4,
                 label_noise: float = 0.2, labels: bool = True):
        super().__init__()
        if groups < 1:
            raise ValueError(f"Denoiser: groups must be >= 1, got {groups}")
        if not 0 <= label_noise <= 1 or box_noise < 0:
            raise ValueError("model.dn_label_noise must be in [0, 1] and model.dn_box_noise >= 0")
        self.num_classes = num_classes
        self.dim = dim
        self.groups = groups
        self.box_noise = box_noise
        self.label_noise = label_noise
        self.dn_pos_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.dn_label_embed = nn.Embedding(num_classes, dim) if labels else None

    def forward(self, targets: Sequence[dict]) -> DenoisingBatch:
        device = self.dn_pos_embed[0].weight.device
        b, g = len(targets), self.groups
        m = max(1, max(len(t["labels"]) for t in targets))
        labels = torch.full((b, m), -1, dtype=torch.int64, device=device)
        boxes = torch.zeros(b, m, 4, device=device)
        boxes[..., 2:] = 0.1
        for i, t in enumerate(targets):
            n = len(t["labels"])
            labels[i, :n] = t["labels"].to(device)
            boxes[i, :n] = t["boxes"].to(device).float()
        labels, boxes = labels.repeat(1, g), boxes.repeat(1, g, 1)  # [B, G*M]
        valid = labels >= 0
        noisy = self._noisy_boxes(boxes)
        query_pos = self.dn_pos_embed(box_sine_embedding(noisy, self.dim))
        if self.dn_label_embed is not None:
            shown = labels.clamp(min=0)
            flip = torch.rand(labels.shape, device=device) < self.label_noise
            shown = torch.where(flip, torch.randint_like(shown, self.num_classes), shown)
            content = self.dn_label_embed(shown) * valid[..., None]
        else:
            content = torch.zeros_like(query_pos)
        return DenoisingBatch(query_pos, content, labels, boxes, valid, g, m)

    def _noisy_boxes(self, boxes: Tensor) -> Tensor:
        if self.box_noise == 0:
            return boxes
        wh = boxes[..., 2:].repeat(1, 1, 2)
        shift = (torch.rand_like(boxes) * 2 - 1) * self.box_noise
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        # corners move by up to box_noise/2 of the size: centre shift and rescale in one go
        xyxy = (xyxy + shift * wh / 2).clamp(0, 1)
        out = box_convert(xyxy, "xyxy", "cxcywh")
        return torch.cat([out[..., :2], out[..., 2:].clamp(min=1e-3)], dim=-1)


def attention_mask(batch: DenoisingBatch, num_queries: int, query_groups: int) -> Tensor:
    """[B, 1, Q+D, Q+D] bool, True where a query may attend to a key. Object queries
    (Q = query_groups x num_queries, group-diagonal as in Group DETR) come first, then the
    D = G x M denoising queries."""
    q = num_queries * query_groups
    d = batch.groups * batch.slots
    b = batch.valid.shape[0]
    device = batch.valid.device
    obj_group = torch.arange(q, device=device) // num_queries
    dn_group = torch.arange(d, device=device) // batch.slots
    allowed = torch.zeros(q + d, q + d, dtype=torch.bool, device=device)
    allowed[:q, :q] = obj_group[:, None] == obj_group[None, :]
    allowed[q:, :num_queries] = True  # denoising sees the first (inference) group
    allowed[q:, q:] = dn_group[:, None] == dn_group[None, :]
    keys = torch.cat([torch.ones(b, q, dtype=torch.bool, device=device), batch.valid], dim=1)
    return (allowed[None] & keys[:, None, :])[:, None]
