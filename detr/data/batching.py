"""Collate detection samples of different image sizes into one padded batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from detr.models.padding import pad_images


def collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, Tensor, list[dict]]:
    """``DataLoader`` ``collate_fn``: pad images to the largest in the batch.

    Args:
        batch: ``(image, target)`` pairs as the transforms presets give them: ``image`` float
            [3, H_i, W_i]; ``target`` a dict (``boxes`` normalised cxcywh relative to the unpadded
            image, ``labels``, ``image_id``, ``orig_size``, ``size``).

    Returns:
        ``(images, mask, targets)``: ``images`` [B, 3, H_max, W_max] with each image at the
        top-left and zeros elsewhere; ``mask`` [B, H_max, W_max] bool, True on padding;
        ``targets`` the list of the B target dicts, unchanged (boxes stay relative to each
        image's own ``size``, not to the padded canvas).

    Raises:
        ValueError: the batch is empty or an item is not an ``(image, target)`` pair.
    """
    if len(batch) == 0:
        raise ValueError("collate: got an empty batch")
    for i, item in enumerate(batch):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict)):
            raise ValueError(f"collate: batch item {i} is not an (image, target dict) pair")
    images, mask = pad_images([image for image, _ in batch])
    return images, mask, [target for _, target in batch]
