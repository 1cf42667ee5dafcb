"""DETR's encoder-decoder transformer.

Tensors are batch-first inside: sequences [B, L, d]. Positional encodings are added to queries
and keys at every layer, not to values (the paper); ``input_pos`` also adds them once to the
encoder's input, ``value_pos`` to the values of the decoder's cross-attention. The decoder adds
the learned query positions to its queries. Parameter names equal the official release's
(``self_attn.in_proj_weight``, ``multihead_attn.out_proj.weight``, ``linear1``, ``norm3``,
``decoder.norm``...), so official checkpoints load strictly; attention itself runs on
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters, on SDPA.

    ``key_padding_mask`` [B, Lk] bool is True where a key must be ignored (padding);
    ``attend`` [Lq, Lk] or [B, 1, Lq, Lk] bool, True where a query may attend to a key (query
    groups, denoising queries).
    Set ``keep_weights = True`` to store the head-averaged attention [B, Lq, Lk] of the last
    call in ``last_weights`` (explicit softmax; for attention maps, not for training speed).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        """``dim`` divisible by ``num_heads`` (the model config checks ``model.hidden_dim``)."""
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        self.keep_weights = False
        self.last_weights: Tensor | None = None

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, attend: Tensor | None = None) -> Tensor:
        d = query.shape[-1]
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:  # self-attention: one matmul for q and k (sliced: ONNX opset 17
            qk = F.linear(query, w[: 2 * d], b[: 2 * d])  # has no Split by output count)
            q, k = qk[..., :d], qk[..., d:]
        else:
            q, k = F.linear(query, w[:d], b[:d]), F.linear(key, w[d: 2 * d], b[d: 2 * d])
        v = F.linear(value, w[2 * d:], b[2 * d:])
        q, k, v = (self._heads(t) for t in (q, k, v))
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        if attend is not None:
            mask = attend if mask is None else mask & attend
        if self.keep_weights:
            self.last_weights = self._weights(q, k, mask)
        dropout = self.dropout if self.training else 0.0
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # The CPU's bf16 attention kernels are 1.9-7x slower than its fp32 ones (forward +
            # backward, at DETR's sizes; benchmarks/cpu_attention.py), so attend in fp32 there.
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                     attn_mask=mask, dropout_p=dropout)
            out = out.to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _heads(self, t: Tensor) -> Tensor:
        """[B, L, d] -> [B, heads, L, d / heads]."""
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    @staticmethod
    def _weights(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(-1).mean(1).detach()


class FeedForward(nn.Module):
    """Shared by both layer types: ``linear2(dropout(relu(linear1(x))))`` with official names."""

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(FeedForward):
    """Self-attention + FFN; post-norm (paper) or pre-norm."""

    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = Attention(d, nheads, dropout)
        self.linear1 = nn.Linear(d, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, src: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        if self.pre_norm:
            x = self.norm1(src)
            qk = x + pos
            src = src + self.dropout1(self.self_attn(qk, qk, x, mask))
            return src + self.dropout2(self._ffn(self.norm2(src)))
        qk = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(qk, qk, src, mask)))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class DecoderLayer(FeedForward):
    """Query self-attention, cross-attention to the encoder memory, FFN.

    The cross-attention's keys are ``memory + pos``; its values are ``memory`` (the paper), or
    ``memory + pos`` with ``value_pos``.
    """

    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool,
                 value_pos: bool = False):
        super().__init__()
        self.value_pos = value_pos
        self.self_attn = Attention(d, nheads, dropout)
        self.multihead_attn = Attention(d, nheads, dropout)
        self.linear1 = nn.Linear(d, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))
        self.pre_norm = pre_norm

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                mask: Tensor | None, attend: Tensor | None = None) -> Tensor:
        if self.pre_norm:
            x = self.norm1(tgt)
            qk = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(qk, qk, x, attend=attend))
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(self._cross(x + query_pos, memory, pos, mask))
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(qk, qk, tgt, attend=attend)))
        cross = self._cross(tgt + query_pos, memory, pos, mask)
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))

    def _cross(self, query: Tensor, memory: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        key = memory + pos
        return self.multihead_attn(query, key, key if self.value_pos else memory, mask)


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int, norm: nn.Module | None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src: Tensor, pos: Tensor, mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, mask)
        return src if self.norm is None else self.norm(src)


class Decoder(nn.Module):
    """Returns every layer's output, each through the shared final ``norm``: [L, B, Q, d]."""

    def __init__(self, layer: DecoderLayer, num_layers: int, norm: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                mask: Tensor | None, attend: Tensor | None = None) -> Tensor:
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, mask, attend)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    """The encoder-decoder. Defaults are the paper's: d=256, 8 heads, 6+6 layers, FFN 2048,
    positions added to the attention's queries and keys only. ``input_pos``: also added to the
    encoder's input ``src``; ``value_pos``: see :class:`DecoderLayer`."""

    def __init__(self, *, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 pre_norm: bool = False, input_pos: bool = False, value_pos: bool = False):
        super().__init__()
        self.input_pos = input_pos
        enc = EncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        dec = DecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm, value_pos)
        self.encoder = Encoder(enc, num_encoder_layers, nn.LayerNorm(d_model) if pre_norm else None)
        self.decoder = Decoder(dec, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        self.nhead = nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor | None, query_embed: Tensor,
                pos: Tensor, query_attend: Tensor | None = None,
                tgt: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run encoder and decoder.

        Args:
            src: projected features [B, d, h, w]; pos: their encoding [B, d, h, w].
            mask: [B, h, w] bool, True on padding; None when nothing is padded.
            query_embed: query positions, [Q, d] (learned, shared by the batch) or [B, Q, d].
            query_attend: [Q, Q] or [B, 1, Q, Q] bool, which queries may attend to which
                (None: all).
            tgt: the queries' initial content [B, Q, d]; None = zeros (the paper).

        Returns:
            ``hs`` [L, B, Q, d] (every decoder layer, normed) and ``memory`` [B, d, h, w].
        """
        b, d, h, w = src.shape
        hs, memory = self.forward_tokens(
            src.flatten(2).transpose(1, 2), None if mask is None else mask.flatten(1),
            query_embed, pos.flatten(2).transpose(1, 2), query_attend, tgt)
        return hs, memory.transpose(1, 2).reshape(b, d, h, w)

    def forward_tokens(self, src: Tensor, mask: Tensor | None, query_embed: Tensor,
                       pos: Tensor, query_attend: Tensor | None = None,
                       tgt: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` on a token sequence (one grid flattened, or the tokens of several
        levels): ``src``, ``pos`` [B, N, d]; ``mask`` [B, N] or None. Returns ``hs`` and
        ``memory`` [B, N, d]."""
        query_pos = (query_embed if query_embed.dim() == 3
                     else query_embed.expand(src.shape[0], -1, -1))
        if self.input_pos:
            src = src + pos
        memory = self.encoder(src, pos, mask)
        tgt = torch.zeros_like(query_pos) if tgt is None else tgt
        return self.decoder(tgt, memory, pos, query_pos, mask, query_attend), memory
