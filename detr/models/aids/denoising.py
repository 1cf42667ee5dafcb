"""Denoising training (DN-DETR, Li et al. 2022) for plain DETR (``model.aids.denoising``).

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
(``denoiser.dn_pos_embed``, ``denoiser.dn_label_embed``) exist only when denoising is on.
The losses ``loss_ce_dn``, ``loss_bbox_dn``, ``loss_giou_dn`` (and per aux layer) compare each
query with the object it was made from, weighted like the matched terms and normalised by the
number of boxes (all groups summed, as Group DETR).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss

from detr.config import DenoisingConfig
from detr.models.aids.base import Queries, TrainingAid, block_diagonal


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
    (the same frequencies as the feature map's sine encoding); ``dim`` divisible by 8 (the
    model config checks ``model.hidden_dim``)."""
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
        super().__init__()  # ranges: checked by DenoisingConfig
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


def attention_mask(batch: DenoisingBatch, num_queries: int, objects: Tensor) -> Tensor:
    """[B, 1, Q+D, Q+D] bool, True where a query may attend to a key. The Q object queries
    come first, attending to each other as ``objects`` [Q, Q] says (all, or group-diagonal
    with Group DETR's query groups), then the D = G x M denoising queries."""
    q = len(objects)
    d = batch.groups * batch.slots
    b = batch.valid.shape[0]
    device = batch.valid.device
    allowed = torch.zeros(q + d, q + d, dtype=torch.bool, device=device)
    allowed[:q, :q] = objects
    allowed[q:, :num_queries] = True  # denoising sees the first (inference) group
    allowed[q:, q:] = block_diagonal(batch.groups, batch.slots, device)
    keys = torch.cat([torch.ones(b, q, dtype=torch.bool, device=device), batch.valid], dim=1)
    return (allowed[None] & keys[:, None, :])[:, None]


class Denoising(TrainingAid):
    """The denoising queries and their losses. Adds ``outputs["denoising"]`` (in training,
    when the forward pass gets ``targets``): the denoising queries' ``pred_logits``,
    ``pred_boxes``, ``aux_outputs`` and their :class:`DenoisingBatch` under ``batch``."""

    name = "denoising"
    parts = ("denoiser",)
    class_sized = ("denoiser.dn_label_embed.",)

    def __init__(self, cfg: DenoisingConfig, *, num_classes: int, dim: int, num_queries: int):
        super().__init__()
        self.num_queries = num_queries
        self.denoiser = Denoiser(num_classes, dim, groups=cfg.groups, box_noise=cfg.box_noise,
                                 label_noise=cfg.label_noise, labels=cfg.labels)

    def extend_queries(self, queries: Queries, targets: Sequence[dict] | None) -> Queries:
        """Append each image's denoising queries after the object queries (``queries.pos``
        [Q, d] becomes [B, Q + D, d])."""
        if targets is None:
            return queries
        dn = self.denoiser(targets)
        obj = queries.pos.expand(len(targets), -1, -1)
        q = obj.shape[1]
        objects = (queries.attend if queries.attend is not None
                   else torch.ones(q, q, dtype=torch.bool, device=obj.device))
        content = torch.zeros_like(obj) if queries.content is None else queries.content
        return queries.with_state(
            self.name, (q, dn), pos=torch.cat([obj, dn.query_pos.to(obj)], dim=1),
            content=torch.cat([content, dn.content.to(obj)], dim=1),
            attend=attention_mask(dn, self.num_queries, objects))

    def outputs(self, queries, hs, memory, mask, heads) -> dict:
        if self.name not in queries.state:
            return {}
        start, dn = queries.state[self.name]
        return {"denoising": {**heads(hs[:, :, start:start + dn.groups * dn.slots]),
                              "batch": dn}}

    def losses(self, outputs: dict, targets: Sequence[dict], *, num_boxes: Tensor,
               empty_weight: Tensor) -> dict[str, Tensor]:
        """Losses of the denoising queries: fixed targets, no matching, no "no object"."""
        if "denoising" not in outputs:
            return {}
        dn = outputs["denoising"]["batch"]
        layers = [*outputs["denoising"].get("aux_outputs", []), outputs["denoising"]]
        valid = dn.valid
        labels = dn.labels[valid]
        tgt = dn.boxes[valid].float()
        out = {}
        for i, layer in enumerate(layers):
            suffix = "_dn" if i == len(layers) - 1 else f"_dn_{i}"
            logits = layer["pred_logits"][valid].float()
            src = layer["pred_boxes"][valid].float()
            ce = F.cross_entropy(logits, labels, reduction="sum") / num_boxes
            l1 = F.l1_loss(src, tgt, reduction="sum") / num_boxes
            giou = generalized_box_iou_loss(box_convert(src, "cxcywh", "xyxy"),
                                            box_convert(tgt, "cxcywh", "xyxy"),
                                            reduction="sum") / num_boxes
            out.update({f"loss_ce{suffix}": ce, f"loss_bbox{suffix}": l1,
                        f"loss_giou{suffix}": giou})
        return out

    def loss_weights(self, matched: dict[str, float]) -> dict[str, float]:
        return {f"{name}_dn": weight for name, weight in matched.items()}
