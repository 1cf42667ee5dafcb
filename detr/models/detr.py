"""The DETR detector: backbone -> 1x1 projection -> transformer -> class and box heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detr.config import ModelConfig
from detr.models.backbone import Backbone, Joiner
from detr.models.denoising import Denoiser, attention_mask
from detr.models.padding import pad_images
from detr.models.position_encoding import build_position_encoding
from detr.models.transformer import Transformer


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim],
                                                                     strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


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
        ``query_groups``: G, only in training with G > 1 (Group DETR): then Q = G x num_queries,
            group g being queries [g * num_queries, (g + 1) * num_queries).
        ``denoising``: only in training with a ``denoiser`` and ``targets`` given (DN-DETR):
            the denoising queries' outputs (``pred_logits``, ``pred_boxes``, ``aux_outputs``)
            and their :class:`~detr.models.denoising.DenoisingBatch` under ``batch``.
        ``dense``: only in training with ``dense_aux``: ``pred_logits`` [B, h*w, num_classes + 1]
            of every encoder token and the feature padding ``mask`` [B, h, w]; with
            ``dense_boxes`` also ``pred_ltrb`` [B, h*w, 4] in (0, 1): each token's distances to
            the left, top, right and bottom sides of its box, as fractions of the image's size.
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, *, num_classes: int,
                 num_queries: int, aux_loss: bool = True, query_groups: int = 1,
                 denoiser: Denoiser | None = None, dense_aux: bool = False,
                 dense_boxes: bool = False):
        super().__init__()
        if query_groups < 1:
            raise ValueError(f"model.query_groups must be >= 1, got {query_groups}")
        d = transformer.d_model
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.transformer = transformer
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d)
        self.input_proj = nn.Conv2d(backbone.num_channels, d, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.query_groups = query_groups
        if query_groups > 1:  # training-only queries; the official keys stay as they are
            self.group_query_embed = nn.Embedding((query_groups - 1) * num_queries, d)
        self.denoiser = denoiser  # training-only queries; absent unless configured
        # training-only dense class head on the encoder tokens; absent unless configured
        self.dense_embed = nn.Linear(d, num_classes + 1) if dense_aux else None
        if dense_boxes and not dense_aux:
            raise ValueError("model.dense_boxes needs model.dense_aux: true (the dense head's "
                             "class targets choose the box each token regresses)")
        # training-only: each token's distances to the sides of its box (dense_boxes)
        self.dense_bbox_embed = MLP(d, d, 4, 3) if dense_boxes else None

    def forward(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None,
                targets: Sequence[dict] | None = None, *, padded: bool | None = None) -> dict:
        """``targets`` (training only) feed the denoising queries when there is a denoiser.
        ``padded``: whether ``mask`` marks any padding; None looks, a data-dependent branch
        that ``torch.export`` cannot trace (:mod:`detr.export` passes True or False)."""
        if mask is None:
            images, mask = pad_images(images)
        if padded is None:
            padded = bool(mask.any())
        features, mask, pos = self.backbone(images, mask, padded)
        # Without padding the attention needs no mask, which lets SDPA use its fastest kernels.
        attn_mask = mask if padded else None
        groups = self.query_groups if self.training else 1
        queries, attend, content = self.query_embed.weight, None, None
        if groups > 1:
            queries = torch.cat([queries, self.group_query_embed.weight])
            attend = _block_diagonal(groups, self.num_queries, queries.device)
        dn = None
        if self.training and self.denoiser is not None and targets is not None:
            dn = self.denoiser(targets)
            obj = queries.expand(len(targets), -1, -1)
            queries = torch.cat([obj, dn.query_pos.to(obj)], dim=1)
            content = torch.cat([torch.zeros_like(obj), dn.content.to(obj)], dim=1)
            attend = attention_mask(dn, self.num_queries, groups)
        hs, memory = self.transformer(self.input_proj(features), attn_mask, queries, pos, attend,
                                      content)
        if dn is not None:
            num_obj = self.num_queries * groups
            out = self.heads(hs[:, :, :num_obj])
            out["denoising"] = {**self.heads(hs[:, :, num_obj:]), "batch": dn}
        else:
            out = self.heads(hs)
        if groups > 1:
            out["query_groups"] = groups
        if self.training and self.dense_embed is not None:
            tokens = memory.flatten(2).transpose(1, 2)
            out["dense"] = {"pred_logits": self.dense_embed(tokens), "mask": mask}
            if self.dense_bbox_embed is not None:
                out["dense"]["pred_ltrb"] = self.dense_bbox_embed(tokens).sigmoid()
        return out

    def heads(self, hs: Tensor) -> dict:
        """Decoder states [L, B, Q, d] -> output dict (see class docstring)."""
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx}
                                  for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)]
        return out


def _block_diagonal(groups: int, size: int, device: torch.device) -> Tensor:
    """[G*n, G*n] bool: True where both indices are in the same group of ``size``."""
    group = torch.arange(groups * size, device=device) // size
    return group[:, None] == group[None, :]


def build_model(cfg: ModelConfig) -> DETR:
    """Build a DETR from the ``model:`` config section (weights: see ``cfg.backbone_weights``)."""
    backbone = Backbone(cfg.backbone, dilation=cfg.dilation, norm=cfg.norm,
                        weights=cfg.backbone_weights, freeze_stem=cfg.freeze_stem,
                        mask_padding=cfg.mask_padding, last_stage=cfg.last_stage)
    joiner = Joiner(backbone, build_position_encoding(cfg.position_embedding, cfg.hidden_dim))
    transformer = Transformer(
        d_model=cfg.hidden_dim, nhead=cfg.nheads, num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout, pre_norm=cfg.pre_norm, input_pos=cfg.input_pos,
        value_pos=cfg.value_pos,
    )
    if cfg.dn_groups < 0:
        raise ValueError(f"model.dn_groups must be >= 0 (0 = off), got {cfg.dn_groups}")
    denoiser = None
    if cfg.dn_groups > 0:
        denoiser = Denoiser(cfg.num_classes, cfg.hidden_dim, groups=cfg.dn_groups,
                            box_noise=cfg.dn_box_noise, label_noise=cfg.dn_label_noise,
                            labels=cfg.dn_labels)
    return DETR(joiner, transformer, num_classes=cfg.num_classes, num_queries=cfg.num_queries,
                aux_loss=cfg.aux_loss, query_groups=cfg.query_groups, denoiser=denoiser,
                dense_aux=cfg.dense_aux, dense_boxes=cfg.dense_boxes)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}

