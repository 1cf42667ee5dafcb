"""The DETR detector: backbone -> 1x1 projection -> transformer -> class and box heads."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn

from detr.config import AidsConfig, ModelConfig
from detr.device import full_precision
from detr.models.aids import AIDS, Denoising, DenseHead, Queries, QueryGroups, TrainingAid
from detr.models.backbone import Backbone, Joiner, feature_stages
from detr.models.mlp import MLP
from detr.models.multiscale import MultiScale, split_levels
from detr.models.padding import pad_images
from detr.models.position_encoding import build_position_encoding
from detr.models.segmentation import DETRsegm, fpn_stages
from detr.models.transformer import Transformer


class DetrPass(NamedTuple):
    """One forward pass of :class:`DETR`: ``out`` its output dict; ``hs`` [L, B, Q', d] the
    decoder states of every query (the ``num_queries`` learned object queries first, then the
    training aids' own); ``memory`` [B, d, h, w] the encoder output; ``src`` [B, d, h, w] the
    projected backbone features (the encoder's input); ``mask`` [B, h, w] their padding (True
    = padding); ``levels`` every backbone level's ``(features, mask)`` in stride order;
    ``padded``: whether the batch has padding."""

    out: dict
    hs: Tensor
    memory: Tensor
    src: Tensor
    mask: Tensor
    levels: list[tuple[Tensor, Tensor]]
    padded: bool


class Encoded(NamedTuple):
    """What :meth:`DETR.encode_decode` gives: ``hs`` [L, B, Q', d] the decoder states; the
    encoder ``memory`` [B, d, h, w] and its padding ``mask`` [B, h, w] (with multi-scale
    features, lists of both, one per level, finest first); ``src`` [B, d, h, w] the last
    level's projected features; ``levels`` every backbone level's ``(features, mask)``."""

    hs: Tensor
    memory: Tensor | list[Tensor]
    mask: Tensor | list[Tensor]
    src: Tensor
    levels: list[tuple[Tensor, Tensor]]


class DETR(nn.Module):
    """DEtection TRansformer (Carion et al. 2020).

    Input: normalised images (ImageNet mean/std), either a batched tensor [B,3,H,W] (no padding),
    a list of [3,H_i,W_i] tensors (padded inside), or a padded tensor plus ``mask`` [B,H,W]
    (True on padding).

    Output dict:
        ``pred_logits`` [B, Q, num_classes + 1]: class logits, the last is "no object";
        ``pred_boxes`` [B, Q, 4]: normalised (cx, cy, w, h) in [0, 1], relative to each image's
            own (unpadded) size;
        ``aux_outputs``: the same two keys for each decoder layer but the last (if aux_loss);
        in training, each training aid's outputs under its name (:mod:`detr.models.aids`):
        ``query_groups`` (then Q = G x num_queries), ``denoising`` (when ``targets`` are
        given), ``dense``.

    ``multiscale``: None (the paper: the transformer sees the last backbone stage) or the
    projections of the earlier levels it also sees (:mod:`detr.models.multiscale`).
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, *, num_classes: int,
                 num_queries: int, aux_loss: bool = True,
                 multiscale: MultiScale | None = None):
        super().__init__()
        d = transformer.d_model
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.transformer = transformer
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d)
        self.input_proj = nn.Conv2d(backbone.num_channels, d, kernel_size=1)
        self.backbone = backbone
        self.multiscale = multiscale
        self.aux_loss = aux_loss
        self.aids: list[TrainingAid] = []  # training only; see attach()

    def attach(self, aid: TrainingAid) -> None:
        """Add a training aid. Its modules become the model's own under their names (the
        state-dict keys ``group_query_embed.*``, ``denoiser.*``, ``dense_embed.*`` ...); the
        aid itself is not a child module. Aids act in the order they are attached."""
        for name, module in aid.named_children():
            if name not in aid.parts:
                raise ValueError(f"{type(aid).__name__}: module {name!r} not in its parts")
            self.add_module(name, module)
        self.aids.append(aid)

    def forward(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None,
                targets: Sequence[dict] | None = None, *, padded: bool | None = None) -> dict:
        """``targets`` (training only) feed the aids that need them (denoising queries).
        ``padded``: whether ``mask`` marks any padding; None looks, a data-dependent branch
        that ``torch.export`` cannot trace (:mod:`detr.export` passes True or False)."""
        return self.forward_pass(images, mask, targets, padded=padded).out

    def forward_pass(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None,
                     targets: Sequence[dict] | None = None, *,
                     padded: bool | None = None) -> DetrPass:
        """:meth:`forward`, with what heads on top of DETR (the mask head) read besides its
        output dict: see :class:`DetrPass`."""
        if mask is None:
            images, mask = pad_images(images)
        if padded is None:
            padded = bool(mask.any())
        aids = self.aids if self.training else []
        queries = Queries(self.query_embed.weight, num_object=self.num_queries)
        for aid in aids:
            queries = aid.extend_queries(queries, targets)
        enc = self.encode_decode(images, mask, padded, queries)
        with full_precision(enc.hs):  # fp32 from the transformer
            out = self.heads(enc.hs[:, :, :queries.num_object] if aids else enc.hs)
            for aid in aids:
                out.update(aid.outputs(queries, enc.hs, enc.memory, enc.mask, self.heads))
        memory, mask = enc.memory, enc.mask
        if self.multiscale is not None:  # the mask head reads the last level's
            memory, mask = memory[-1], mask[-1]
        return DetrPass(out, enc.hs, memory, enc.src, mask, enc.levels, padded)

    def encode_decode(self, images: Tensor, mask: Tensor, padded: bool,
                      queries: Queries) -> Encoded:
        """Backbone, projection, transformer (see :class:`Encoded`)."""
        if self.multiscale is not None:
            levels = self.backbone.forward_levels(images, mask, padded)
            tokens = self.multiscale(dict(zip(self.backbone[0].levels, levels, strict=True)),
                                     self.input_proj)
            with full_precision(tokens.src):
                hs, memory = self.transformer.forward_tokens(
                    tokens.src.float(), tokens.mask if padded else None, queries.pos,
                    tokens.pos, queries.attend, queries.content)
            return Encoded(hs, split_levels(memory, tokens.shapes), tokens.masks,
                           split_levels(tokens.src, tokens.shapes)[-1],
                           [(f, m) for f, m, _ in levels])
        features, mask, pos, levels = self.backbone(images, mask, padded)
        src = self.input_proj(features)
        # Without padding the attention needs no mask, which lets SDPA use its fastest kernels.
        # Under bf16 autocast the backbone and the projection are bf16, the rest fp32.
        with full_precision(src):
            hs, memory = self.transformer(src.float(), mask if padded else None,
                                          queries.pos, pos, queries.attend, queries.content)
        return Encoded(hs, memory, mask, src, levels)

    @property
    def feature_stride(self) -> int:
        """Input pixels per cell of the finest feature level the transformer sees."""
        backbone = self.backbone[0]
        if self.multiscale is None:
            return backbone.stride
        return backbone.stage_stride(self.multiscale.stages[0])

    @staticmethod
    def training_only_prefixes() -> tuple[str, ...]:
        """State-dict prefixes of every kind of training aid, attached or not: a checkpoint
        may have them when the model does not, and the other way round."""
        return tuple(p for aid in AIDS for p in aid.training_only_prefixes())

    @staticmethod
    def class_sized_prefixes() -> tuple[str, ...]:
        """State-dict prefixes of the tensors sized by the number of classes."""
        return ("class_embed.", *(p for aid in AIDS for p in aid.class_sized))

    def heads(self, hs: Tensor) -> dict:
        """Decoder states [L, B, Q, d] -> output dict (see class docstring)."""
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx}
                                  for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)]
        return out


def build_model(cfg: ModelConfig, *,
                backbone_state: dict[str, Tensor] | None = None) -> DETR | DETRsegm:
    """Build a DETR from the ``model:`` config section. ``cfg.backbone_weights``: None or
    "imagenet" (torchvision's download); a file's weights come in ``backbone_state`` (a
    torchvision ResNet state dict: :func:`detr.hub.build` reads the file).

    With ``cfg.task`` segmentation or panoptic: a :class:`DETRsegm` (the DETR under
    ``detr``, its backbone returning the levels the mask head reads); with
    ``cfg.mask_head_only`` its detector is frozen and has no training aids."""
    masks = cfg.task != "detection"
    if cfg.mask_head_only:  # aids would train the frozen detector: nothing
        cfg = dataclasses.replace(cfg, aids=AidsConfig())
    weights = cfg.backbone_weights
    if weights not in (None, "imagenet") and backbone_state is None:
        raise ValueError(f"model.backbone_weights: {weights!r} is a file: build the model with "
                         f"detr.hub.build(cfg), which reads it, or pass backbone_state")
    backbone = Backbone(cfg.backbone, dilation=cfg.dilation, norm=cfg.norm,
                        weights=backbone_state if backbone_state is not None else weights,
                        freeze_stem=cfg.freeze_stem,
                        mask_padding=cfg.mask_padding, last_stage=cfg.last_stage,
                        levels=(*feature_stages(cfg.last_stage, cfg.feature_levels)[:-1],
                                *(fpn_stages(cfg.last_stage) if masks else ())))
    joiner = Joiner(backbone, build_position_encoding(cfg.position_embedding, cfg.hidden_dim))
    transformer = Transformer(
        d_model=cfg.hidden_dim, nhead=cfg.nheads, num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout, pre_norm=cfg.pre_norm, input_pos=cfg.input_pos,
        value_pos=cfg.value_pos,
    )
    aids, d, classes = cfg.aids, cfg.hidden_dim, cfg.num_classes
    # The denoiser draws its initial weights before the heads, the other aids after them: the
    # order of the first runs, kept so that seeded trainings repeat them bit for bit.
    denoising = (Denoising(aids.denoising, num_classes=classes, dim=d,
                           num_queries=cfg.num_queries) if aids.denoising else None)
    model = DETR(joiner, transformer, num_classes=classes, num_queries=cfg.num_queries,
                 aux_loss=cfg.aux_loss, multiscale=_multiscale(cfg, backbone))
    if aids.query_groups:  # first: it extends the object queries, denoising appends to them
        model.attach(QueryGroups(aids.query_groups, dim=d, num_queries=cfg.num_queries))
    if denoising:
        model.attach(denoising)
    if aids.dense:
        model.attach(DenseHead(aids.dense, num_classes=classes, dim=d))
    return DETRsegm(model, freeze_detr=cfg.mask_head_only) if masks else model


def _multiscale(cfg: ModelConfig, backbone: Backbone) -> MultiScale | None:
    """The extra levels' projections (``model.feature_levels`` > 1), else None (the paper).
    Nothing is built (or drawn from the RNG) for 1: seeded trainings of the paper's
    configuration repeat their initial weights."""
    if cfg.feature_levels == 1:
        return None
    stages = feature_stages(cfg.last_stage, cfg.feature_levels)
    channels = dict(zip(backbone.levels, backbone.level_channels, strict=True))
    return MultiScale(stages, [channels[s] for s in stages], cfg.hidden_dim)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}

