"""Where DETR's object queries look: the last decoder layer's cross-attention.

DETR's paper shows, for each detected object, the attention of its query (last decoder layer,
averaged over heads) over the encoder's feature map: it lights up the object's extremities.
:func:`cross_attention` runs a model once with that attention recorded;
:func:`attention_heatmap` turns one query's map into a picture-sized heat map.

Contract: ``weights`` [B, Q, h, w] float32, for each image and query a distribution over the
h x w feature cells: it sums to 1 over the image's own cells and is 0 on its padding
(``padding`` [B, h, w] bool, True on padded cells; all False without padding). Cell (i, j)
covers input pixels [i * stride, (i + 1) * stride) x [j * stride, (j + 1) * stride) of the
padded batch fed to the model. With multi-scale features (``model.feature_levels`` > 1) the
map is on the finest level's grid: a coarser cell's weight is spread evenly over the finest
cells it covers, so the contract holds as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class CrossAttention:
    """One forward pass with its last-layer cross-attention (module doc for the contract).

    ``outputs``: the model's output dict; ``weights`` [B, Q, h, w]; ``padding`` [B, h, w];
    ``stride``: input pixels per feature cell.
    """

    outputs: dict
    weights: Tensor
    padding: Tensor
    stride: int


class _Recorder:
    """What the hooks saw during one forward pass."""

    def __init__(self) -> None:
        self.input_size: tuple[int, int] | None = None
        self.features: tuple[Tensor, Tensor] | None = None  # (features, mask) of the backbone
        self.levels = None  # multi-scale: the Tokens the model's multiscale module made

    def backbone_hook(self, module: nn.Module, args: tuple, output: tuple) -> None:
        self.input_size = tuple(args[0].shape[-2:])
        self.features = (output[0], output[1])

    def levels_hook(self, module: nn.Module, args: tuple, output) -> None:
        self.levels = output


def last_cross_attention_layer(model: nn.Module) -> nn.Module:
    """The ``Attention`` module of the last decoder layer's cross-attention.

    Raises:
        ValueError: ``model`` is not a DETR (no ``transformer.decoder.layers``).
    """
    try:
        return model.transformer.decoder.layers[-1].multihead_attn
    except (AttributeError, IndexError) as exc:
        raise ValueError(f"{type(model).__name__} has no DETR decoder "
                         f"(transformer.decoder.layers[-1].multihead_attn)") from exc


@contextmanager
def keep_cross_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Record the last decoder layer's cross-attention while inside; yields that module
    (``last_weights`` [B, Q, h * w] after each forward). Its ``keep_weights`` setting is
    restored and the stored weights dropped on exit, also on error."""
    layer = last_cross_attention_layer(model)
    previous = layer.keep_weights
    layer.keep_weights = True
    try:
        yield layer
    finally:
        layer.keep_weights = previous
        layer.last_weights = None


def cross_attention(model: nn.Module, images: Tensor | Sequence[Tensor],
                    mask: Tensor | None = None) -> CrossAttention:
    """Run ``model`` on ``images`` (as :class:`detr.models.detr.DETR` takes them: a [B,3,H,W]
    batch, a list of [3,H_i,W_i] images, or a padded batch with its ``mask``) without
    gradients; return its outputs with the cross-attention of every query (module doc).

    Precision and mode are the caller's: put the model in eval mode for inference maps. A
    segmentation model's maps are its detector's (``model.detr``; outputs without masks).
    """
    model = getattr(model, "detr", model)
    recorder = _Recorder()
    multiscale = getattr(model, "multiscale", None)
    hooks = [model.backbone.register_forward_hook(recorder.backbone_hook)]
    if multiscale is not None:
        hooks.append(multiscale.register_forward_hook(recorder.levels_hook))
    try:
        with keep_cross_attention(model) as layer, torch.no_grad():
            outputs = model(images) if mask is None else model(images, mask)
            flat = layer.last_weights
    finally:
        for hook in hooks:
            hook.remove()
    if recorder.levels is not None:
        strides = [model.backbone[0].stage_stride(s) for s in multiscale.stages]
        weights = _on_finest_level(flat.float(), recorder.levels, strides)
        return CrossAttention(outputs, weights, recorder.levels.masks[0], strides[0])
    features, padding = recorder.features
    b, _, h, w = features.shape
    weights = flat.float().reshape(b, flat.shape[1], h, w)
    return CrossAttention(outputs, weights, padding, _stride(recorder.input_size, (h, w)))


def _on_finest_level(flat: Tensor, tokens, strides: Sequence[int]) -> Tensor:
    """Weights [B, Q, N] over the tokens of every level (a :class:`detr.models.multiscale.
    Tokens`, levels at ``strides`` px, finest first) -> [B, Q, h, w] on the finest grid: each
    cell of a level k times coarser gives 1 / k^2 of its weight to each of the k x k finest
    cells it covers; the padding's share is dropped and each map renormalised to sum to 1."""
    (h, w), padding = tokens.shapes[0], tokens.masks[0]
    total = flat.new_zeros(*flat.shape[:2], h, w)
    parts = flat.split([lh * lw for lh, lw in tokens.shapes], dim=-1)
    for part, shape, stride in zip(parts, tokens.shapes, strides, strict=True):
        k = stride // strides[0]
        grid = part.unflatten(-1, shape).repeat_interleave(k, -2).repeat_interleave(k, -1)
        total += grid[..., :h, :w] / k ** 2
    total = total.masked_fill(padding[:, None], 0.0)
    return total / total.sum((-2, -1), keepdim=True).clamp(min=1e-12)


def _stride(input_size: tuple[int, int], feature_size: tuple[int, int]) -> int:
    """Input pixels per feature cell. A ResNet maps n pixels to ceil(n / s) cells at stride
    s (a power of 2), so n / cells lies in (s / 2, s] whenever there are >= 2 cells; with
    one cell any s >= n describes the map."""
    ratio = max(n / cells for n, cells in zip(input_size, feature_size, strict=True))
    return 2 ** math.ceil(math.log2(ratio))


def attention_heatmap(weights: Tensor, padding: Tensor, stride: int,
                      input_size: tuple[int, int],
                      image_size: tuple[int, int] | None = None) -> Tensor:
    """One query's map [h, w] -> a heat map [H, W] in [0, 1] (its maximum is 1) over the
    image: the image's own cells (``padding`` [h, w] False) upsampled bilinearly to
    ``stride`` pixels each, cropped to the model input's size ``input_size`` (H_in, W_in:
    the resized image, without padding), then resized to ``image_size`` (the original
    image's (H, W); default ``input_size``).
    """
    rows = int((~padding).any(1).sum())
    cols = int((~padding).any(0).sum())
    cells = weights[:rows, :cols].float()[None, None]
    heat = F.interpolate(cells, size=(rows * stride, cols * stride), mode="bilinear",
                         align_corners=False)[0, 0]
    heat = heat[:input_size[0], :input_size[1]]
    if image_size is not None and tuple(image_size) != tuple(heat.shape):
        heat = F.interpolate(heat[None, None], size=tuple(image_size), mode="bilinear",
                             align_corners=False)[0, 0]
    heat = heat.clamp(min=0)
    peak = heat.max()
    return heat / peak if peak > 0 else heat


@dataclass(frozen=True)
class QueryAttention:
    """One detection and where its query looked.

    ``query``: the object query's index; ``score`` in [0, 1]; ``label``: category id (as the
    ``postprocess`` maps it); ``box`` [4] absolute xyxy pixels of the original image;
    ``heat`` [H, W] in [0, 1] over the original image (or ``display_size``).
    """

    query: int
    score: float
    label: int
    box: Tensor
    heat: Tensor


def top_query_attention(model: nn.Module, image: Tensor, *, postprocess: nn.Module,
                        orig_size: tuple[int, int], top_k: int = 6,
                        display_size: tuple[int, int] | None = None) -> list[QueryAttention]:
    """The ``top_k`` best-scoring queries of one image and their attention heat maps.

    ``image``: [3, H_in, W_in] as the model takes it (resized, normalised), on the model's
    device; ``orig_size``: (H, W) of the original image, which the boxes refer to;
    ``postprocess``: a :class:`detr.models.postprocess.PostProcess` (labels -> category ids);
    ``display_size``: size of the heat maps, default ``orig_size`` (the boxes are scaled to
    it too). Best score first; no score threshold.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    result = cross_attention(model, image[None])
    size = tuple(display_size or orig_size)
    target = torch.tensor([size], device=result.weights.device)
    det = postprocess(result.outputs, target)[0]
    order = det["scores"].argsort(descending=True, stable=True)[:top_k]
    input_size = tuple(image.shape[-2:])
    return [QueryAttention(
        query=int(q), score=float(det["scores"][q]), label=int(det["labels"][q]),
        box=det["boxes"][q].float().cpu(),
        heat=attention_heatmap(result.weights[0, q], result.padding[0], result.stride,
                               input_size, size).cpu())
        for q in order.tolist()]
