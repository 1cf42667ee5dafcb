"""Multi-scale features (``model.feature_levels`` > 1): the encoder sees several ResNet stages.

DETR's encoder sees one feature map, the last ResNet stage's (stride 32), where an object of
a few pixels is less than a cell. Here it sees the tokens of ``feature_levels`` stages ending at
``model.last_stage`` (e.g. strides 8, 16 and 32), as Deformable DETR feeds its encoder, but
with DETR's own dense attention: every level is projected to ``hidden_dim`` by its own 1x1
convolution, each level's sine positions get a learned *level embedding* added (so a token
says which scale it comes from), the tokens of all levels are concatenated into one sequence,
and so are their padding masks (each exact at its own level). The encoder's self-attention and
the decoder's cross-attention run over the whole sequence. Self-attention is quadratic in the
tokens: at 128 px, strides 8/16/32 give 256 + 64 + 16 tokens.

Parameters: the last level keeps the model's ``input_proj`` (so the paper's configuration,
``feature_levels: 1``, has exactly the official keys); the earlier levels' projections are
``multiscale.input_proj.N`` (N = 0 the finest) and the level embedding
``multiscale.level_embed`` [levels, d].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn


class Tokens(NamedTuple):
    """The levels as one sequence: ``src`` and ``pos`` [B, N, d] (N = sum of h_l * w_l, finest
    level first, each row-major), ``mask`` [B, N] bool (True on padding), ``shapes`` the
    (h_l, w_l) of each level and ``masks`` each level's padding mask [B, h_l, w_l]."""

    src: Tensor
    pos: Tensor
    mask: Tensor
    shapes: list[tuple[int, int]]
    masks: list[Tensor]


class MultiScale(nn.Module):
    """Projections and level embedding of ``stages`` (ResNet stage names, finest first; the
    last is ``model.last_stage``, projected by the model's own ``input_proj``).

    ``channels``: the backbone's channels of each of ``stages``; ``dim``: ``hidden_dim``.
    """

    def __init__(self, stages: Sequence[str], channels: Sequence[int], dim: int):
        super().__init__()
        if len(stages) < 2 or len(stages) != len(channels):
            raise ValueError(f"MultiScale: needs >= 2 stages with their channels, got "
                             f"{list(stages)} and {list(channels)}")
        self.stages = tuple(stages)
        self.input_proj = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in channels[:-1])
        self.level_embed = nn.Parameter(torch.empty(len(stages), dim))
        nn.init.normal_(self.level_embed)

    def forward(self, levels: dict[str, tuple[Tensor, Tensor, Tensor]],
                last_proj: nn.Module) -> Tokens:
        """``levels``: stage name -> (features [B, C_l, h_l, w_l], mask [B, h_l, w_l], pos
        [B, d, h_l, w_l]) as :meth:`~detr.models.backbone.Joiner.forward_levels` gives them
        (other stages are ignored); ``last_proj``: the last level's projection."""
        projections = [*self.input_proj, last_proj]
        src, pos, masks, shapes = [], [], [], []
        for stage, proj, embed in zip(self.stages, projections, self.level_embed, strict=True):
            features, mask, position = levels[stage]
            src.append(proj(features).flatten(2).transpose(1, 2))
            pos.append(position.flatten(2).transpose(1, 2) + embed.to(position.dtype))
            masks.append(mask)
            shapes.append(tuple(features.shape[-2:]))
        return Tokens(torch.cat(src, 1), torch.cat(pos, 1),
                      torch.cat([m.flatten(1) for m in masks], 1), shapes, masks)


def split_levels(memory: Tensor, shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Encoder memory [B, N, d] -> one map [B, d, h_l, w_l] per level of ``shapes``."""
    parts = memory.split([h * w for h, w in shapes], dim=1)
    return [part.transpose(1, 2).unflatten(2, shape) for part, shape in zip(parts, shapes,
                                                                            strict=True)]
