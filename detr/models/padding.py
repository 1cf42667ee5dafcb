"""Batching images of different sizes: zero-pad to the largest, with a padding mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad_images(images: Sequence[Tensor] | Tensor) -> tuple[Tensor, Tensor]:
    """Stack images of different sizes into one batch.

    Args:
        images: a batched tensor [B, C, H, W] (no padding) or a sequence of [C, H_i, W_i] tensors.

    Returns:
        ``(tensors, mask)``: ``tensors`` [B, C, H_max, W_max] with each image at the top-left and
        zeros elsewhere; ``mask`` [B, H_max, W_max] bool, True on padded pixels.
    """
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected a [B, C, H, W] tensor, got shape {tuple(images.shape)}")
        b, _, h, w = images.shape
        return images, torch.zeros((b, h, w), dtype=torch.bool, device=images.device)
    if len(images) == 0:
        raise ValueError("pad_images: got an empty list of images")
    for i, img in enumerate(images):
        if img.dim() != 3:
            raise ValueError(f"image {i}: expected [C, H, W], got shape {tuple(img.shape)}")
    c = images[0].shape[0]
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    first = images[0]
    tensors = first.new_zeros((len(images), c, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=first.device)
    for i, img in enumerate(images):
        tensors[i, :, : img.shape[1], : img.shape[2]].copy_(img)
        mask[i, : img.shape[1], : img.shape[2]] = False
    return tensors, mask
