"""Positional encodings of a feature map: DETR's normalised sine (default) or learned."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding of pixel positions, ``2 * num_pos_feats`` channels (y then x).

    Positions are the cumulative count of non-padded pixels, so padding does not shift the
    encoding of real pixels; with ``normalize`` they are divided by the image's own extent and
    scaled to [0, 2*pi], which makes the encoding independent of the image size.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0,
                 normalize: bool = True, scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale needs normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, mask: Tensor) -> Tensor:
        """mask [B,H,W] bool (True = padding) -> encoding [B, 2*num_pos_feats, H, W] float32."""
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y = y / (y[:, -1:, :] + eps) * self.scale
            x = x / (x[:, :, -1:] + eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        return torch.cat((_interleave(y[..., None] / dim_t), _interleave(x[..., None] / dim_t)),
                         dim=3).permute(0, 3, 1, 2)


def _interleave(t: Tensor) -> Tensor:
    """sin on even channels, cos on odd channels, interleaved: [..., D] -> [..., D]."""
    return torch.stack((t[..., 0::2].sin(), t[..., 1::2].cos()), dim=4).flatten(3)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute row/column embeddings (up to ``max_size`` x ``max_size`` positions)."""

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50):
        super().__init__()
        self.max_size = max_size
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """mask [B,H,W] -> encoding [B, 2*num_pos_feats, H, W] (x then y)."""
        b, h, w = mask.shape
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"learned position embedding covers {self.max_size}x{self.max_size} feature "
                f"positions; got a {h}x{w} feature map (use 'sine' or smaller images)"
            )
        x_emb = self.col_embed(torch.arange(w, device=mask.device))
        y_emb = self.row_embed(torch.arange(h, device=mask.device))
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)],
                        dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(b, -1, -1, -1)


def build_position_encoding(kind: str, hidden_dim: int) -> nn.Module:
    """``kind`` "sine" or "learned"; the encoding has ``hidden_dim`` channels (even: the
    model config checks ``model.hidden_dim``), half for y, half for x."""
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, normalize=True)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"model.position_embedding: unknown {kind!r} (sine, learned)")
