"""DETR's augmentation presets, built from ``torchvision.transforms.v2``.

Input: ``(image, target)`` as :class:`detr.data.coco.CocoDetection` yields it (uint8
``tv_tensors.Image`` [3, H, W]; ``target["boxes"]`` XYXY ``tv_tensors.BoundingBoxes`` in absolute
pixels; ``target["labels"]`` int64 [N]).

Output (both presets): ``image`` float32 [3, H', W'] normalised with ImageNet mean/std (a plain
tensor); ``target["boxes"]`` float32 [N', 4] normalised cxcywh in [0, 1] (divided by W', H');
``target["labels"]`` int64 [N'] (boxes left with no area are dropped along with their labels);
``target["size"]`` int64 [2] = ``(H', W')``; other keys (``image_id``, ``orig_size``) unchanged.

Masks: a ``target["masks"]`` (``tv_tensors.Mask`` uint8 [N, H, W], row i = box i, as
``CocoDetection(masks=True)`` gives it) goes through the same flip, resize (nearest) and crop
as the boxes, and ``SanitizeBoundingBoxes`` drops the rows of the boxes it drops; the output
has ``target["masks"]`` bool [N', H', W'] (a plain tensor), row i = box i. Without masks the
output is as before, to the byte.

Scales are parameters, so small demo images can use small scales; :func:`paper_defaults` gives
the paper's values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def paper_defaults() -> dict[str, Any]:
    """Keyword arguments of :func:`make_transforms` for the DETR paper's COCO recipe.

    Short side 480..800 step 32 (val: 800), long side <= 1333; the crop branch resizes the short
    side to 400/500/600 and crops a 384..600 px region.
    """
    return {
        "scales": tuple(range(480, 801, 32)),
        "max_size": 1333,
        "crop_scales": (400, 500, 600),
        "crop_size": (384, 600),
    }


class RandomSizeCrop(v2.Transform):
    """Crop a region of random size at a random place.

    Height and width are drawn independently and uniformly from ``[min_size, min(extent,
    max_size)]``; when the image side is shorter than ``min_size`` the whole side is kept. Boxes
    are cropped and clamped by ``v2.functional.crop``; run ``SanitizeBoundingBoxes`` afterwards.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def _draw(self, extent: int) -> int:
        high = min(extent, self.max_size)
        low = min(self.min_size, high)
        return int(torch.randint(low, high + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = self._draw(height), self._draw(width)
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class NormalizeBoxes:
    """Last step: CXCYWH pixel boxes -> plain float tensor in [0, 1]; sets ``target["size"]``.

    Also unwraps the image (and ``masks``, as bool) to plain tensors, so batching and the model
    see ordinary tensors.
    """

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        boxes = target["boxes"]
        if boxes.format != tv_tensors.BoundingBoxFormat.CXCYWH:
            raise ValueError(f"NormalizeBoxes: expected CXCYWH boxes, got {boxes.format}")
        height, width = image.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        out = dict(target)
        out["boxes"] = boxes.as_subclass(Tensor).to(torch.float32) / scale
        out["size"] = torch.tensor([height, width], dtype=torch.int64)
        if "masks" in target:
            out["masks"] = target["masks"].as_subclass(Tensor).to(torch.bool)
        return image.as_subclass(Tensor), out


def _check_sizes(scales: Sequence[int], max_size: int, crop_size: tuple[int, int]) -> None:
    if not scales or any(int(s) <= 0 for s in scales):
        raise ValueError(f"make_transforms: scales must be positive sizes, got {list(scales)}")
    if max_size < max(scales):
        raise ValueError(f"make_transforms: max_size {max_size} < the largest scale {max(scales)}")
    if len(crop_size) != 2 or not 0 < crop_size[0] <= crop_size[1]:
        raise ValueError(f"make_transforms: crop_size must be (min, max), got {crop_size}")


def _train_geometry(
    scales: Sequence[int], max_size: int, crop_scales: Sequence[int] | None,
    crop_size: tuple[int, int], hflip: bool,
) -> list[Any]:
    resize = v2.RandomShortestSize(list(scales), max_size=max_size)
    steps: list[Any] = [v2.RandomHorizontalFlip(p=0.5)] if hflip else []
    if crop_scales:
        crop_branch = v2.Compose([
            v2.RandomShortestSize(list(crop_scales)),
            RandomSizeCrop(*crop_size),
            v2.RandomShortestSize(list(scales), max_size=max_size),
        ])
        steps.append(v2.RandomChoice([resize, crop_branch]))  # p = 0.5 each
    else:
        steps.append(resize)
    return steps


def make_transforms(
    preset: Literal["train", "val"],
    *,
    scales: Sequence[int],
    max_size: int,
    crop_scales: Sequence[int] | None = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
    hflip: bool = True,
) -> v2.Compose:
    """Build the ``train`` or ``val`` preset; call it as ``transforms(image, target)``.

    train: horizontal flip (p=0.5, if ``hflip``); then with p=0.5 either a resize of the short
    side to a size drawn from ``scales`` (long side <= ``max_size``), or resize the short side to
    one of ``crop_scales``, crop a random ``crop_size[0]..crop_size[1]`` px region, and resize as
    in the first branch. ``crop_scales=None`` disables the crop branch.
    val: resize the short side to ``max(scales)``, long side <= ``max_size``. Crop and flip
    arguments are ignored.

    Raises:
        ValueError: unknown preset, empty or non-positive scales, ``max_size < max(scales)``, or a
            ``crop_size`` that is not ``(min, max)``.
    """
    _check_sizes(scales, max_size, crop_size)
    if preset == "train":
        geometry = _train_geometry(scales, max_size, crop_scales, crop_size, hflip)
    elif preset == "val":
        geometry = [v2.RandomShortestSize([max(scales)], max_size=max_size)]
    else:
        raise ValueError(f"make_transforms: unknown preset {preset!r} (use 'train' or 'val')")
    return v2.Compose([
        *geometry,
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        v2.SanitizeBoundingBoxes(labels_getter="default"),
        v2.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.CXCYWH),
        NormalizeBoxes(),
    ])
