"""The paper's mask head on top of DETR (Carion et al. 2020, section 4.4, panoptic segmentation).

For each object query, a multi-head attention map over the encoder memory (the backbone's last
stage, stride 32) says where the query looks. A small FPN-style convolutional head takes the
projected backbone features next to these maps and, adding the backbone's layer3, layer2 and
layer1 features on the way up, turns them into one mask logit map per query at stride 4.
Module names are the official release's (``bbox_attention.q_linear``, ``mask_head.lay1`` ...
``lay5``, ``gn1`` ... ``gn5``, ``out_lay``, ``adapter1`` ... ``adapter3``), with the box model
under ``detr.``, so the official panoptic checkpoints load strictly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detr.models.backbone import STAGES

MASK_STRIDE = 4  # input pixels per cell of ``pred_masks`` (the stride of layer1)
MASK_HEAD_PREFIXES = ("bbox_attention.", "mask_head.")  # what a box checkpoint lacks
_GROUPS = 8  # GroupNorm groups of the official head (fewer where a narrow layer has < 8 channels)


class MaskInputs(NamedTuple):
    """What the mask head reads of one forward pass: ``queries`` [B, Q, d] (last decoder
    layer), ``memory`` [B, d, h, w], ``mask`` [B, h, w] or None (no padding), ``src``
    [B, d, h, w] (projected features), ``fpns`` (the :func:`fpn_stages` features) and
    ``valid`` (None, or the real cells at each resolution: see :class:`MaskHead`)."""

    queries: Tensor
    memory: Tensor
    mask: Tensor | None
    src: Tensor
    fpns: list[Tensor]
    valid: list[Tensor] | None

    def select(self, images: Tensor, queries: Tensor) -> MaskInputs:
        """The inputs of the (image, query) pairs ``images[i]``, ``queries[i]`` ([P] int64)
        as P images of one query each."""
        def rows(x):
            return None if x is None else x[images]
        return MaskInputs(self.queries[images, queries][:, None], self.memory[images],
                          rows(self.mask), self.src[images], [f[images] for f in self.fpns],
                          None if self.valid is None else [v[images] for v in self.valid])


class QueryMasks:
    """The mask head bound to one forward pass: ``masks(images, queries)`` ([P] int64 each)
    -> [P, h, w] mask logits, row i = ``pred_masks[images[i], queries[i]]``; :meth:`all` ->
    the whole ``pred_masks`` [B, Q, h, w]; ``grid`` = (h, w)."""

    def __init__(self, model: DETRsegm, inputs: MaskInputs):
        self.model, self.inputs = model, inputs
        self.grid = tuple(inputs.fpns[-1].shape[-2:])
        # The criterion calls it outside the forward pass's autocast: keep the pass's precision.
        self.device_type = inputs.src.device.type
        self.autocast = (torch.is_autocast_enabled(self.device_type),
                         torch.get_autocast_dtype(self.device_type))

    def __call__(self, images: Tensor, queries: Tensor) -> Tensor:
        return self._run(self.inputs.select(images, queries))[:, 0]

    def all(self) -> Tensor:
        return self._run(self.inputs)

    def _run(self, inputs: MaskInputs) -> Tensor:
        enabled, dtype = self.autocast
        with torch.autocast(self.device_type, dtype=dtype, enabled=enabled):
            return self.model.masks(inputs)

    def zero(self) -> Tensor:
        """A zero that reaches every parameter of the mask head (a loss without matches must
        still give them a gradient under DDP)."""
        params = [p for m in (self.model.bbox_attention, self.model.mask_head)
                  for p in m.parameters()]
        return sum(p.sum() for p in params) * 0.0


def fpn_stages(last_stage: str) -> tuple[str, str, str]:
    """The backbone stages added by ``adapter1``..``adapter3``: layer3, layer2, layer1 (the
    official head). With ``model.last_stage`` layer3 / layer2 the stages after it are not
    built and the last stage stands in for them (it has their resolution or the next finer)."""
    last = STAGES.index(last_stage)
    return tuple(STAGES[min(i, last)] for i in (2, 1, 0))


class AttentionMap(nn.Module):
    """Multi-head attention weights (no values) of queries over a feature map.

    ``forward(queries [B, Q, d], keys [B, d, h, w], mask [B, h, w] | None)`` -> weights
    [B, Q, heads, h, w]: the scaled dot products of each head, normalised by one softmax over
    all heads and positions together (as the official release), 0 on padding (mask True).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AttentionMap: dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.k_linear = nn.Linear(dim, dim)
        for linear in (self.q_linear, self.k_linear):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.scale = (dim / num_heads) ** -0.5

    def forward(self, queries: Tensor, keys: Tensor, mask: Tensor | None = None) -> Tensor:
        b, d, h, w = keys.shape
        head_dim = d // self.num_heads
        q = self.q_linear(queries).unflatten(-1, (self.num_heads, head_dim)) * self.scale
        k = F.conv2d(keys, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        k = k.view(b, self.num_heads, head_dim, h, w)
        weights = torch.einsum("bqnc,bnchw->bqnhw", q, k)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        return weights.flatten(2).softmax(-1).view(weights.shape)


class MaskHead(nn.Module):
    """The FPN-style convolutional head: five 3x3 conv + GroupNorm + ReLU blocks, the channels
    going ``dim`` -> context/2 -> /4 -> /8 -> /16, then a 3x3 conv to one logit.

    ``forward(features, attention, fpns, valid)``:
        ``features`` [B, d, h, w]: the projected last-stage features; ``attention``
        [B, Q, heads, h, w]: each query's attention map over them (``dim`` = d + heads);
        ``fpns``: three backbone feature maps [B, C_i, h_i, w_i], coarse to fine (``fpn_dims``
        their channels), each added after a 1x1 adapter and a nearest upsampling;
        ``valid``: None, or four [B, 1, h_i, w_i] bool maps (True on real cells) at the
        resolutions of ``features`` and ``fpns``: then every convolution sees zeros on the
        padding and every GroupNorm takes its statistics over the real cells only, so an
        image's masks do not depend on the other images of its batch.
    Returns [B, Q, h_3, w_3] mask logits at the resolution of the last of ``fpns``.
    """

    def __init__(self, dim: int, fpn_dims: Sequence[int], context_dim: int):
        super().__init__()
        widths = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        if min(widths) < 1:
            raise ValueError(f"mask head: model.hidden_dim {context_dim} is too small "
                             f"(its /16 layer needs >= 1 channel; use >= 16)")
        for i, (c_in, c_out) in enumerate(zip([dim, *widths[:-1]], widths, strict=True), 1):
            setattr(self, f"lay{i}", nn.Conv2d(c_in, c_out, 3, padding=1))
            setattr(self, f"gn{i}", nn.GroupNorm(math.gcd(_GROUPS, c_out), c_out))
        self.out_lay = nn.Conv2d(widths[-1], 1, 3, padding=1)
        for i, c_in in enumerate(fpn_dims, 1):
            setattr(self, f"adapter{i}", nn.Conv2d(c_in, widths[i], 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Tensor, attention: Tensor, fpns: Sequence[Tensor],
                valid: Sequence[Tensor] | None = None) -> Tensor:
        b, q = attention.shape[:2]
        x = torch.cat([features[:, None].expand(-1, q, -1, -1, -1), attention], 2)
        x = x.flatten(0, 1)  # [B*Q, d + heads, h, w]
        cells = [None] * 4 if valid is None else [_per_query(v, q) for v in valid]
        x = self._block(1, x, cells[0])
        x = self._block(2, x, cells[0])
        for i, fpn in enumerate(fpns, 1):
            skip = getattr(self, f"adapter{i}")(fpn)
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = (skip[:, None] + x.unflatten(0, (b, q))).flatten(0, 1)
            x = self._block(i + 2, x, cells[i])
        x = self.out_lay(_zero_padding(x, cells[3]))
        return x.view(b, q, *x.shape[-2:])

    def _block(self, i: int, x: Tensor, valid: Tensor | None) -> Tensor:
        x = getattr(self, f"lay{i}")(_zero_padding(x, valid))
        return F.relu(masked_group_norm(x, getattr(self, f"gn{i}"), valid))


def _per_query(valid: Tensor, queries: int) -> Tensor:
    """[B, 1, h, w] -> [B*Q, 1, h, w]: each image's map for each of its queries."""
    return valid[:, None].expand(-1, queries, -1, -1, -1).flatten(0, 1)


def _zero_padding(x: Tensor, valid: Tensor | None) -> Tensor:
    return x if valid is None else x * valid.to(x.dtype)


def masked_group_norm(x: Tensor, norm: nn.GroupNorm, valid: Tensor | None) -> Tensor:
    """``norm(x)`` ([N, C, h, w]) with each group's mean and variance taken over the cells
    where ``valid`` ([N, 1, h, w] bool, at least one True per sample) is True; None = all
    cells (plain GroupNorm). The statistics are in float32 (as autocast runs GroupNorm)."""
    if valid is None:
        return norm(x)
    n, c, h, w = x.shape
    groups = x.float().reshape(n, norm.num_groups, -1, h * w)
    weight = valid.reshape(n, 1, 1, h * w).float()
    count = weight.sum(-1, keepdim=True) * groups.shape[2]
    mean = (groups * weight).sum((2, 3), keepdim=True) / count
    var = ((groups - mean).square() * weight).sum((2, 3), keepdim=True) / count
    out = ((groups - mean) * torch.rsqrt(var + norm.eps)).view(n, c, h, w)
    return (out * norm.weight[:, None, None] + norm.bias[:, None, None]).to(x.dtype)


class DETRsegm(nn.Module):
    """DETR with the paper's mask head: DETR's output dict plus ``pred_masks``
    [B, num_queries, ceil(H/4), ceil(W/4)] float mask logits of the object queries, on the
    padded batch's grid at stride 4 (H, W: the padded batch size). Only the last decoder layer
    gets masks (``aux_outputs`` carry none); training aids' queries get none, and with query
    groups only the first group (the queries inference uses) does.

    In training (``matched_masks_only``, the default) the output has ``query_masks`` (a
    :class:`QueryMasks`) instead of ``pred_masks``: the criterion asks it for the masks of the
    matched queries only. A query's mask depends on nothing but its own decoder state and its
    image, so they are the same numbers, and the mask head's cost grows with the objects, not
    with the queries (the loss reads no other mask).

    Args:
        detr: a :class:`~detr.models.detr.DETR` whose backbone returns the levels
            :func:`fpn_stages` names (``build_model`` builds it so for ``model.task``
            segmentation / panoptic). It is the child ``detr`` (state-dict keys ``detr.*``).
        freeze_detr: the paper's two-step training: the detector's parameters do not train
            and it stays in eval mode (dropout off, BatchNorm statistics fixed); only
            ``bbox_attention`` and ``mask_head`` learn.
        matched_masks_only: see above; False gives ``pred_masks`` in training too.

    With the backbone's ``mask_padding`` (``model.mask_padding``) the mask head handles a
    padded batch exactly (see :class:`MaskHead`); without it, as the official release, its
    convolutions and GroupNorms also see the padding.
    """

    def __init__(self, detr: nn.Module, *, freeze_detr: bool = False,
                 matched_masks_only: bool = True):
        super().__init__()
        self.detr = detr
        self.freeze_detr = freeze_detr
        self.matched_masks_only = matched_masks_only
        if freeze_detr:
            for param in detr.parameters():
                param.requires_grad_(False)
            detr.eval()
        backbone = detr.backbone[0]
        self.fpn_levels = fpn_stages(backbone.last_stage)
        missing = [s for s in self.fpn_levels if s not in backbone.levels]
        if missing:
            raise ValueError(f"DETRsegm: the backbone does not return levels {missing}: build "
                             f"it with levels={self.fpn_levels} (build_model does, for "
                             f"model.task segmentation / panoptic)")
        channels = dict(zip(backbone.levels, backbone.level_channels, strict=True))
        d, heads = detr.transformer.d_model, detr.transformer.nhead
        self.bbox_attention = AttentionMap(d, heads)
        self.mask_head = MaskHead(d + heads, [channels[s] for s in self.fpn_levels], d)

    def forward(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None,
                targets: Sequence[dict] | None = None, *, padded: bool | None = None,
                lazy_masks: bool | None = None) -> dict:
        """As :meth:`DETR.forward <detr.models.detr.DETR.forward>`, plus ``pred_masks``, or
        with ``lazy_masks`` ``query_masks`` (a :class:`QueryMasks`, e.g. for a predictor that
        wants the masks of its kept detections only); None = lazy in training with
        ``matched_masks_only`` (see the class docstring)."""
        run = self.detr.forward_pass(images, mask, targets, padded=padded)
        levels = dict(zip(self.detr.backbone[0].levels, run.levels, strict=True))
        valid = None
        if run.padded and self.detr.backbone[0].mask_padding:
            valid = [~m[:, None] for m in (run.mask, *(levels[s][1] for s in self.fpn_levels))]
        masks = QueryMasks(self, MaskInputs(
            run.hs[-1, :, :self.detr.num_queries], run.memory,
            run.mask if run.padded else None, run.src,
            [levels[s][0] for s in self.fpn_levels], valid))
        if lazy_masks is None:
            lazy_masks = self.training and self.matched_masks_only
        if lazy_masks:
            return {**run.out, "query_masks": masks}
        return {**run.out, "pred_masks": masks.all()}

    def masks(self, inputs: MaskInputs) -> Tensor:
        """The mask head on :class:`MaskInputs` of B images and Q queries -> [B, Q, h, w]."""
        attention = self.bbox_attention(inputs.queries, inputs.memory, inputs.mask)
        return self.mask_head(inputs.src, attention, inputs.fpns, inputs.valid)

    def train(self, mode: bool = True) -> DETRsegm:
        super().train(mode)
        if self.freeze_detr:
            self.detr.eval()
        return self

    @property
    def aids(self) -> list:
        """The inner detector's training aids (the criterion adds their loss terms)."""
        return self.detr.aids

    @property
    def num_queries(self) -> int:
        return self.detr.num_queries

    @property
    def num_classes(self) -> int:
        return self.detr.num_classes

    @property
    def feature_stride(self) -> int:
        """The detector's (:attr:`detr.models.detr.DETR.feature_stride`)."""
        return self.detr.feature_stride

    def training_only_prefixes(self) -> tuple[str, ...]:
        """The detector's training-only state-dict prefixes, under ``detr.``."""
        return tuple(f"detr.{p}" for p in self.detr.training_only_prefixes())

    def class_sized_prefixes(self) -> tuple[str, ...]:
        """The detector's class-sized state-dict prefixes, under ``detr.``."""
        return tuple(f"detr.{p}" for p in self.detr.class_sized_prefixes())
