"""Images as the predictor takes them: a path, a PIL image or a tensor, each read into a CPU
tensor [3, H, W] (:func:`load_image`), alone or as a batch (:func:`as_list`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from detr.data.coco import ImageLoadError

ImageInput = str | Path | Image.Image | Tensor


def load_image(source: ImageInput, *, index: int | None = None) -> Tensor:
    """An image as a CPU tensor [3, H, W]: uint8 from a file or a PIL image (converted to RGB);
    a tensor passes through (uint8, or float -> float32; grey [1, H, W] repeated to RGB).

    Raises:
        ImageLoadError: a path that is missing or not a readable image (the message names it).
        ValueError: a tensor of another shape or dtype, or another type (named by ``index``).
    """
    where = "image" if index is None else f"image {index}"
    if isinstance(source, str | Path):
        return _read_file(Path(source))
    if isinstance(source, Image.Image):
        return F.pil_to_tensor(source.convert("RGB"))
    if not isinstance(source, Tensor):
        raise ValueError(f"{where}: expected a path, a PIL image or a [3, H, W] tensor, got "
                         f"{type(source).__name__}")
    if source.ndim != 3 or source.shape[0] not in (1, 3):
        raise ValueError(f"{where}: expected a [3, H, W] tensor, got shape {tuple(source.shape)}")
    pixels = source.detach().cpu().as_subclass(Tensor)
    if pixels.is_floating_point():
        pixels = pixels.to(torch.float32)
    elif pixels.dtype != torch.uint8:
        raise ValueError(f"{where}: tensor must be uint8 or float in [0, 1], got {pixels.dtype}")
    return pixels.expand(3, -1, -1).contiguous() if pixels.shape[0] == 1 else pixels


def _read_file(path: Path) -> Tensor:
    if not path.is_file():
        raise ImageLoadError(f"{path}: image file not found")
    try:
        with Image.open(path) as pil:
            rgb = pil.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{path}: not a readable image: {err}") from err
    return F.pil_to_tensor(rgb)


def as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """One image, a [B, 3, H, W] tensor or an iterable of images -> a list of images."""
    if isinstance(images, Tensor):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, str | Path | Image.Image):
        return [images]
    return list(images)
