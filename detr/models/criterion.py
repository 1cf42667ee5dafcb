"""DETR's set prediction loss: Hungarian matching, then class + L1 + GIoU on matched pairs."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_area, box_convert, generalized_box_iou_loss

from detr.config import LossConfig
from detr.models.matcher import HungarianMatcher, Indices

_AUX_SUFFIX = re.compile(r"_\d+$")  # loss_ce_3 -> loss_ce


class SetCriterion(nn.Module):
    """Loss of DETR's outputs against targets (``labels`` [N] int64, ``boxes`` [N,4] cxcywh).

    Returns a dict of scalar tensors: ``loss_ce`` (cross-entropy, the no-object class weighted by
    ``eos_coef``; with ``iou_aware`` against IoU-aware targets, see :meth:`_loss_ce_iou_aware`),
    ``loss_bbox`` (L1) and ``loss_giou`` (1 - GIoU), both summed over matched pairs and divided
    by the number of target boxes (averaged over processes under DDP); the same for
    every auxiliary decoder layer with suffix ``_0``, ``_1``...; and, for logging only,
    ``class_error`` (% wrong classes among matched queries, last layer) and
    ``cardinality_error`` (|predicted objects - targets|, last layer). :meth:`total` weights
    and sums the loss terms.

    With ``outputs["query_groups"] = G`` (Group DETR) each group of queries is matched to the
    targets on its own and the groups' losses are summed. With ``outputs["denoising"]``
    (DN-DETR) the denoising queries add ``loss_ce_dn``, ``loss_bbox_dn`` and ``loss_giou_dn``
    (and per aux layer), each query against the object it was made from, weighted like the
    matched terms and normalised by the number of boxes (all groups summed, as Group DETR).
    With ``outputs["dense"]`` (``model.dense_aux``) the encoder tokens add ``loss_ce_dense``
    (weight ``dense_loss_coef``) and, with ``pred_ltrb`` (``model.dense_boxes``),
    ``loss_bbox_dense`` and ``loss_giou_dense`` (the matched terms' weights); see :meth:`_dense`.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, *, eos_coef: float = 0.1,
                 ce_loss_coef: float = 1.0, bbox_loss_coef: float = 5.0,
                 giou_loss_coef: float = 2.0, dense_loss_coef: float = 1.0,
                 iou_aware: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.iou_aware = iou_aware
        self.matcher = matcher
        self.coefs = {"loss_ce": ce_loss_coef, "loss_bbox": bbox_loss_coef,
                      "loss_giou": giou_loss_coef, "loss_ce_dense": dense_loss_coef,
                      "loss_bbox_dense": bbox_loss_coef, "loss_giou_dense": giou_loss_coef}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        groups = outputs.get("query_groups", 1)
        layers = [g for o in [*outputs.get("aux_outputs", []), outputs] for g in _split(o, groups)]
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
        if "denoising" in outputs:
            losses.update(self._denoising(outputs["denoising"], num_boxes))
        if "dense" in outputs:
            losses.update(self._dense(outputs["dense"], targets))
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum of the loss terms (logging-only keys ignored)."""
        return sum(self.coefs[_base_name(k)] * v
                   for k, v in losses.items() if _base_name(k) in self.coefs)

    def _denoising(self, outputs: dict, num_boxes: Tensor) -> dict[str, Tensor]:
        """Losses of the denoising queries: fixed targets, no matching, no "no object"."""
        dn = outputs["batch"]
        layers = [*outputs.get("aux_outputs", []), outputs]
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

    def _dense(self, dense: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        """``loss_ce_dense``: cross-entropy of every real encoder token against
        :func:`dense_targets`, the no-object class weighted by ``eos_coef``, as a weighted
        mean. With ``pred_ltrb``: ``loss_bbox_dense`` and ``loss_giou_dense``, L1 (cxcywh) and
        1 - GIoU of each assigned token's box (its centre minus/plus the predicted distances)
        against its target box, averaged over the assigned tokens."""
        logits, mask = dense["pred_logits"].float(), dense["mask"]
        assigned = torch.stack([dense_assignment(t["boxes"].to(logits.device), ~m)
                                for t, m in zip(targets, mask, strict=True)])  # [B, h*w]
        classes = torch.stack([_labels_of(a, t["labels"].to(logits.device), self.num_classes)
                               for a, t in zip(assigned, targets, strict=True)])
        weights = self.empty_weight[classes] * (~mask).flatten(1)
        ce = F.cross_entropy(logits.flatten(0, 1), classes.flatten(), reduction="none")
        total = _mean_over_processes(weights.sum().detach()).clamp(min=1)
        out = {"loss_ce_dense": (ce * weights.flatten()).sum() / total}
        if "pred_ltrb" not in dense:
            return out
        ltrb = dense["pred_ltrb"].float()
        image, token = (assigned >= 0).nonzero(as_tuple=True)
        centres = torch.stack([torch.stack(cell_centres(~m), -1) for m in mask])  # [B, h*w, 2]
        c, d = centres[image, token], ltrb[image, token]
        src = torch.cat([c - d[:, :2], c + d[:, 2:]], -1)  # xyxy
        offsets = torch.tensor([0] + [len(t["labels"]) for t in targets]).cumsum(0)
        tgt_cxcywh = torch.cat([t["boxes"] for t in targets]).to(ltrb)
        tgt_cxcywh = tgt_cxcywh[assigned[image, token] + offsets[image.cpu()].to(ltrb.device)]
        num = _mean_over_processes(ltrb.new_tensor(float(len(image)))).clamp(min=1)
        out["loss_bbox_dense"] = F.l1_loss(box_convert(src, "xyxy", "cxcywh"), tgt_cxcywh,
                                           reduction="sum") / num
        out["loss_giou_dense"] = generalized_box_iou_loss(
            src, box_convert(tgt_cxcywh, "cxcywh", "xyxy"), reduction="sum") / num
        return out

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
        return ce.sum((1, 2)) / _mean_over_processes(weights.detach())

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
        return ce.sum((1, 2)) / _mean_over_processes(weights.sum((1, 2)).detach())

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
        return _mean_over_processes(n).clamp(min=1)


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


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (xyxy, [N, 4] each) -> [N]; 0 where the union is empty.
    (``torchvision.ops.box_iou`` gives all N x N pairs.)"""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh.prod(-1)
    union = box_area(a) + box_area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def cell_centres(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Centres (x, y) of the [h, w] cells of a feature map, each [h * w], normalised to the
    image's extent in cells (``valid``'s True part, at the top left)."""
    h, w = valid.shape
    rows, cols = valid[:, 0].sum(), valid[0].sum()
    cy = (torch.arange(h, device=valid.device) + 0.5) / rows
    cx = (torch.arange(w, device=valid.device) + 0.5) / cols
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")
    return cx.flatten(), cy.flatten()


def _base_name(key: str) -> str:
    """loss_ce_3 / loss_ce_dn / loss_ce_dn_3 -> loss_ce."""
    return _AUX_SUFFIX.sub("", key).removesuffix("_dn")


def _mean_over_processes(x: Tensor) -> Tensor:
    """``x`` averaged over DDP processes (``x`` itself in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def _split(outputs: dict, groups: int) -> list[dict]:
    """One decoder layer's outputs -> one dict per query group."""
    if groups == 1:
        return [outputs]
    return [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in
            zip(outputs["pred_logits"].chunk(groups, 1), outputs["pred_boxes"].chunk(groups, 1),
                strict=True)]


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


def build_criterion(num_classes: int, cfg: LossConfig) -> SetCriterion:
    """The matcher and criterion from the ``loss:`` config section."""
    matcher = HungarianMatcher(cost_class=cfg.set_cost_class, cost_bbox=cfg.set_cost_bbox,
                               cost_giou=cfg.set_cost_giou)
    return SetCriterion(num_classes, matcher, eos_coef=cfg.eos_coef,
                        ce_loss_coef=cfg.ce_loss_coef, bbox_loss_coef=cfg.bbox_loss_coef,
                        giou_loss_coef=cfg.giou_loss_coef, dense_loss_coef=cfg.dense_loss_coef,
                        iou_aware=cfg.iou_aware)
