"""DETR's set prediction loss: Hungarian matching, then class + L1 + GIoU on matched pairs."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_area, box_convert, generalized_box_iou_loss

from detr.config import LossConfig
from detr.distributed import mean_over_processes
from detr.models.aids.base import TrainingAid
from detr.models.mask_loss import mask_losses
from detr.models.matcher import HungarianMatcher, Indices

_AUX_SUFFIX = re.compile(r"_\d+$")  # loss_ce_3 -> loss_ce
_CORE_OUTPUTS = {"pred_logits", "pred_boxes", "aux_outputs", "pred_masks", "query_masks"}


class SetCriterion(nn.Module):
    """Loss of DETR's outputs against targets (``labels`` [N] int64, ``boxes`` [N,4] cxcywh).

    Returns a dict of scalar tensors: ``loss_ce`` (cross-entropy, the no-object class weighted by
    ``eos_coef``; with ``iou_aware`` against IoU-aware targets, see :meth:`_loss_ce_iou_aware`),
    ``loss_bbox`` (L1) and ``loss_giou`` (1 - GIoU), both summed over matched pairs and divided
    by the number of target boxes (averaged over processes under DDP); the same for
    every auxiliary decoder layer with suffix ``_0``, ``_1``...; and, for logging only,
    ``class_error`` (% wrong classes among matched queries, last layer) and
    ``cardinality_error`` (|predicted objects - targets|, last layer). :meth:`total` weights
    and sums the loss terms. With ``pred_masks`` / ``query_masks`` in the outputs (the
    segmentation model), ``loss_mask`` and ``loss_dice`` of the last layer's matched masks
    against the targets' ``masks`` (:func:`detr.models.mask_loss.mask_losses`).

    Each training aid (:mod:`detr.models.aids`) may split the object queries into sets
    matched each on its own (Group DETR's query groups: their losses are summed), and adds
    its own loss terms and weights (``loss_ce_dn``..., ``loss_ce_dense``...).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, *, eos_coef: float = 0.1,
                 ce_loss_coef: float = 1.0, bbox_loss_coef: float = 5.0,
                 giou_loss_coef: float = 2.0, iou_aware: bool = False,
                 mask_coef: float = 1.0, dice_coef: float = 1.0,
                 aids: Sequence[TrainingAid] = ()):
        super().__init__()
        self.num_classes = num_classes
        self.iou_aware = iou_aware
        self.matcher = matcher
        self.aids = list(aids)  # the model's: not registered here (their weights are its own)
        matched = {"loss_ce": ce_loss_coef, "loss_bbox": bbox_loss_coef,
                   "loss_giou": giou_loss_coef}
        self.coefs = {**matched, "loss_mask": mask_coef, "loss_dice": dice_coef}
        for aid in self.aids:
            self.coefs.update(aid.loss_weights(matched))
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        self._check_aids(outputs)
        decoder_layers = [*outputs.get("aux_outputs", []), outputs]
        layers = [s for o in decoder_layers for s in self._query_sets(o, outputs)]
        groups = len(layers) // len(decoder_layers)  # query sets per layer
        indices = self.matcher.match_layers(layers, targets)
        logits = torch.stack([o["pred_logits"] for o in layers]).float()  # [L, B, Q, C+1]
        boxes = torch.stack([o["pred_boxes"] for o in layers]).float()  # [L, B, Q, 4]
        pairs = _flatten_indices(indices, targets, logits.device)
        num_boxes = self._num_boxes(targets, logits.device)
        target_classes = self._target_classes(logits, targets, pairs)
        matched = (pairs["layer"], pairs["batch"], pairs["query"])
        src = boxes[matched]  # [P, 4] each matched prediction, and its target box:
        tgt = torch.cat([t["boxes"] for t in targets]).to(boxes)[pairs["target"]]
        if self.iou_aware:
            loss_ce = self._loss_ce_iou_aware(logits, target_classes, matched, src, tgt)
        else:
            loss_ce = self._loss_ce(logits, target_classes)
        per_layer = {"loss_ce": loss_ce,
                     **self._loss_boxes(src, tgt, pairs["layer"], len(boxes), num_boxes)}
        per_layer = {k: v.view(-1, groups).sum(1) for k, v in per_layer.items()}
        losses = {}
        last = len(layers) // groups - 1
        for name, values in per_layer.items():
            losses[name] = values[last]
            for i in range(last):
                losses[f"{name}_{i}"] = values[i]
        first_group_of_last = len(layers) - groups
        losses.update(self._logged(logits[first_group_of_last], target_classes[first_group_of_last],
                                   targets))
        if "pred_masks" in outputs or "query_masks" in outputs:  # the first query set has masks
            losses.update(mask_losses(outputs, targets, indices[first_group_of_last], num_boxes))
        for aid in self.aids:
            losses.update(aid.losses(outputs, targets, num_boxes=num_boxes,
                                     empty_weight=self.empty_weight))
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum of the loss terms (logging-only keys ignored)."""
        return sum(self.coefs[_base_name(k)] * v
                   for k, v in losses.items() if _base_name(k) in self.coefs)

    def _check_aids(self, outputs: dict) -> None:
        """Refuse outputs of a training aid this criterion does not know (its losses would be
        silently missing): each aid's outputs are under its name."""
        unknown = set(outputs) - _CORE_OUTPUTS - {aid.name for aid in self.aids}
        if unknown:
            raise ValueError(f"outputs of training aid(s) {sorted(unknown)} but the criterion "
                             f"has none: build_criterion(num_classes, loss_cfg, model.aids)")

    def _query_sets(self, layer: dict, outputs: dict) -> list[dict]:
        """One decoder layer's outputs -> the query sets matched each on its own (one, unless
        an aid splits them)."""
        sets = [layer]
        for aid in self.aids:
            sets = [part for s in sets for part in aid.split(s, outputs)]
        return sets

    def _target_classes(self, logits: Tensor, targets: Sequence[dict], pairs: dict) -> Tensor:
        """[L, B, Q] class of each query's matched target; ``num_classes`` (no object) else."""
        classes = torch.full(logits.shape[:3], self.num_classes, dtype=torch.int64,
                             device=logits.device)
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        classes[pairs["layer"], pairs["batch"], pairs["query"]] = labels[pairs["target"]]
        return classes

    def _loss_ce(self, logits: Tensor, target_classes: Tensor) -> Tensor:
        """Weighted mean cross-entropy per layer, as F.cross_entropy(weight=...) per layer: [L].

        Under DDP the weight sum is averaged over processes (like the number of boxes), so
        N processes x B images give the gradient of one process with N x B images.
        """
        ce = F.cross_entropy(logits.flatten(0, 2), target_classes.flatten(),
                             weight=self.empty_weight, reduction="none").view(target_classes.shape)
        weights = self.empty_weight[target_classes].sum((1, 2))
        return ce.sum((1, 2)) / mean_over_processes(weights.detach())

    def _loss_ce_iou_aware(self, logits: Tensor, target_classes: Tensor,
                           matched: tuple[Tensor, Tensor, Tensor], src: Tensor,
                           tgt: Tensor) -> Tensor:
        """As :meth:`_loss_ce`, but a matched query's target is split: IoU (of its box ``src``
        with the target box ``tgt``, no gradient) on the class, 1 - IoU on "no object". Weights
        as there: 1 for a matched query, ``eos_coef`` for the others (all "no object")."""
        log_prob = logits.log_softmax(-1)
        share = torch.ones_like(target_classes, dtype=log_prob.dtype)
        share[matched] = paired_iou(box_convert(src, "cxcywh", "xyxy"),
                                    box_convert(tgt, "cxcywh", "xyxy")).detach()
        on_class = log_prob.gather(-1, target_classes[..., None]).squeeze(-1)
        weights = self.empty_weight[target_classes]
        ce = -(share * on_class + (1 - share) * log_prob[..., -1]) * weights
        return ce.sum((1, 2)) / mean_over_processes(weights.sum((1, 2)).detach())

    def _loss_boxes(self, src: Tensor, tgt: Tensor, layer: Tensor, num_layers: int,
                    num_boxes: Tensor) -> dict[str, Tensor]:
        """Matched boxes ``src``/``tgt`` [P, 4] cxcywh, ``layer`` [P] -> L1 and GIoU per layer."""
        l1 = F.l1_loss(src, tgt, reduction="none").sum(-1)
        giou = generalized_box_iou_loss(box_convert(src, "cxcywh", "xyxy"),
                                        box_convert(tgt, "cxcywh", "xyxy"), reduction="none")
        zeros = src.new_zeros(num_layers)
        return {"loss_bbox": zeros.index_add(0, layer, l1) / num_boxes,
                "loss_giou": zeros.index_add(0, layer, giou) / num_boxes}

    @torch.no_grad()
    def _logged(self, logits: Tensor, target_classes: Tensor,
                targets: Sequence[dict]) -> dict[str, Tensor]:
        """Last layer's [B, Q, C+1] logits and [B, Q] matched classes -> logging metrics."""
        matched = target_classes != self.num_classes
        pred = logits.argmax(-1)
        correct = (pred == target_classes)[matched].float()
        accuracy = correct.mean() * 100 if len(correct) else logits.new_tensor(100.0)
        num_pred = (logits.argmax(-1) != self.num_classes).sum(-1).float()
        num_tgt = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        return {"class_error": 100 - accuracy,
                "cardinality_error": F.l1_loss(num_pred, num_tgt.float())}

    @staticmethod
    def _num_boxes(targets: Sequence[dict], device: torch.device) -> Tensor:
        """Target boxes in the batch, averaged over DDP processes, at least 1."""
        n = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        return mean_over_processes(n).clamp(min=1)


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (xyxy, [N, 4] each) -> [N]; 0 where the union is empty.
    (``torchvision.ops.box_iou`` gives all N x N pairs.)"""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh.prod(-1)
    union = box_area(a) + box_area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def _base_name(key: str) -> str:
    """loss_ce_3 -> loss_ce; loss_ce_dn_3 -> loss_ce_dn."""
    return _AUX_SUFFIX.sub("", key)


def _flatten_indices(indices: list[Indices], targets: Sequence[dict],
                     device: torch.device) -> dict[str, Tensor]:
    """Per-layer, per-image matches -> flat index tensors ``layer``, ``batch``, ``query`` and
    ``target`` (index into the batch's concatenated targets)."""
    offsets = torch.tensor([0] + [len(t["labels"]) for t in targets]).cumsum(0)
    layer, batch, query, target = [], [], [], []
    for li, per_image in enumerate(indices):
        for bi, (q, t) in enumerate(per_image):
            layer.append(torch.full_like(q, li))
            batch.append(torch.full_like(q, bi))
            query.append(q)
            target.append(t + offsets[bi])
    cat = (lambda xs: torch.cat(xs).to(device)) if layer else (
        lambda xs: torch.empty(0, dtype=torch.int64, device=device))
    return {"layer": cat(layer), "batch": cat(batch), "query": cat(query), "target": cat(target)}


def build_criterion(num_classes: int, cfg: LossConfig,
                    aids: Sequence[TrainingAid] = ()) -> SetCriterion:
    """The matcher and criterion from the ``loss:`` config section, with the loss terms of the
    model's training ``aids`` (``model.aids``; their weights are in their config)."""
    matcher = HungarianMatcher(cost_class=cfg.set_cost_class, cost_bbox=cfg.set_cost_bbox,
                               cost_giou=cfg.set_cost_giou)
    return SetCriterion(num_classes, matcher, eos_coef=cfg.eos_coef,
                        ce_loss_coef=cfg.ce_loss_coef, bbox_loss_coef=cfg.bbox_loss_coef,
                        giou_loss_coef=cfg.giou_loss_coef, iou_aware=cfg.iou_aware,
                        mask_coef=cfg.mask_coef, dice_coef=cfg.dice_coef, aids=aids)
