"""A COCO-format detection dataset on pycocotools, returning tv_tensors for transforms v2.

Canonical layout (what ``prepare`` writes and :meth:`CocoDetection.from_root` reads)::

    <root>/annotations/{train,val}.json     COCO json
    <root>/images/{train,val}/<file_name>   file_name relative to images/<split>/

Category ids in the json may be any integers (COCO's run 1..90 with gaps). The dataset maps
them, sorted by id, to contiguous labels ``0..C-1``; :meth:`CocoDetection.label_map` gives the
mapping as a plain dict to store in a checkpoint, and :func:`category_ids_from_label_map`
reads it back.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

Target = dict[str, Any]
Transforms = Callable[[tv_tensors.Image, Target], tuple[Any, Target]]


class ImageLoadError(OSError):
    """An image listed in the annotations is missing, unreadable or not the size it claims."""


class AnnotationError(ValueError):
    """The annotation file is malformed (e.g. an annotation names an unknown category)."""


def load_coco(ann_file: str | Path) -> COCO:
    """Load a COCO json with pycocotools, without its progress prints on stdout.

    Raises:
        FileNotFoundError: ``ann_file`` does not exist (the message names it).
    """
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def category_ids_from_label_map(label_map: dict[str, Any]) -> list[int]:
    """Category id of each contiguous label, from a dict made by :meth:`CocoDetection.label_map`.

    Raises:
        ValueError: ``label_map`` is not of the form ``{"categories": [{"id": ...}, ...]}``.
    """
    try:
        return [int(c["id"]) for c in label_map["categories"]]
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"not a label map (expected {{'categories': [{{'id': int, 'name': str}}, ...]}}): "
            f"missing or bad {err}"
        ) from err


class CocoDetection(Dataset):
    """Images and box targets from a COCO json, one item per image in the json (sorted by id).

    ``dataset[i]`` returns ``transforms(image, target)``, or ``(image, target)`` without
    transforms, where before transforms:

    - ``image``: ``tv_tensors.Image`` uint8 [3, H, W], RGB (grey, RGBA, palette and CMYK files are
      converted; alpha is dropped).
    - ``target["boxes"]``: ``tv_tensors.BoundingBoxes`` float32 [N, 4], format XYXY, absolute
      pixels, ``canvas_size=(H, W)``. Crowd annotations (``iscrowd=1``) and boxes with no width or
      height after clamping to the image are dropped.
    - ``target["labels"]``: int64 [N], contiguous labels ``0..C-1`` (see ``label_to_category``).
    - ``target["image_id"]``: int, the json's image id.
    - ``target["orig_size"]``: int64 [2], ``(H, W)`` of the image file.

    Raises (from ``__getitem__``):
        ImageLoadError: the image file is missing, unreadable, or its size differs from the
            json's ``width``/``height``; the message names the path and the image id.
    """

    def __init__(
        self, image_dir: str | Path, ann_file: str | Path, transforms: Transforms | None = None
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.coco = load_coco(self.ann_file)
        self.ids: list[int] = sorted(self.coco.imgs)
        cats = sorted(self.coco.cats.values(), key=lambda c: int(c["id"]))
        self.categories: list[dict[str, Any]] = [
            {"id": int(c["id"]), "name": str(c["name"])} for c in cats
        ]
        self.label_to_category: list[int] = [c["id"] for c in self.categories]
        self.category_to_label: dict[int, int] = {
            cat: label for label, cat in enumerate(self.label_to_category)
        }

    @classmethod
    def from_root(
        cls, root: str | Path, split: str, transforms: Transforms | None = None
    ) -> CocoDetection:
        """The ``split`` ("train" or "val") of a dataset in the canonical layout under ``root``."""
        root = Path(root)
        return cls(root / "images" / split, root / "annotations" / f"{split}.json", transforms)

    @property
    def num_classes(self) -> int:
        """Number of object classes C (labels are ``0..C-1``; no-object is not counted)."""
        return len(self.categories)

    def label_map(self) -> dict[str, Any]:
        """The label <-> category mapping as plain data, safe to save in a checkpoint.

        ``{"categories": [{"id": int, "name": str}, ...]}`` ordered by label: label ``i`` is
        ``categories[i]``.
        """
        return {"categories": [dict(c) for c in self.categories]}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, Target]:
        image_id = self.ids[index]
        image = self._load_image(image_id)
        target = self._load_target(image_id, canvas_size=tuple(image.shape[-2:]))
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target

    def _load_image(self, image_id: int) -> tv_tensors.Image:
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as pil:
                rgb = pil.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ImageLoadError(f"image id {image_id}: cannot read {path}: {err}") from err
        expected = (info.get("width"), info.get("height"))
        if None not in expected and rgb.size != expected:
            raise ImageLoadError(
                f"image id {image_id}: {path} is {rgb.size[0]}x{rgb.size[1]} (WxH) but the "
                f"annotations say {expected[0]}x{expected[1]}"
            )
        return tv_tensors.Image(F.pil_to_tensor(rgb))

    def _load_target(self, image_id: int, canvas_size: tuple[int, int]) -> Target:
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes, labels = self._boxes_and_labels(anns, image_id, canvas_size)
        return {
            "boxes": boxes,
            "labels": labels,
            "image_id": int(image_id),
            "orig_size": torch.tensor(canvas_size, dtype=torch.int64),
        }

    def _boxes_and_labels(
        self, anns: list[dict[str, Any]], image_id: int, canvas_size: tuple[int, int]
    ) -> tuple[tv_tensors.BoundingBoxes, torch.Tensor]:
        """XYXY boxes clamped to the image, without degenerate ones, and their labels."""
        labels = torch.tensor([self._label_of(a, image_id) for a in anns], dtype=torch.int64)
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(xywh, format="XYWH", canvas_size=canvas_size)
        boxes = F.clamp_bounding_boxes(F.convert_bounding_box_format(boxes, new_format="XYXY"))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return tv_tensors.wrap(boxes[keep], like=boxes), labels[keep]

    def _label_of(self, ann: dict[str, Any], image_id: int) -> int:
        """Contiguous label of ``ann``, after checking its bbox has four numbers."""
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise AnnotationError(
                f"{self.ann_file}: annotation {ann.get('id')} of image {image_id}: bbox must be "
                f"[x, y, w, h], got {bbox!r}"
            )
        try:
            return self.category_to_label[int(ann["category_id"])]
        except KeyError as err:
            raise AnnotationError(
                f"{self.ann_file}: annotation {ann.get('id')} of image {image_id} has "
                f"category_id {ann.get('category_id')}, which is not in 'categories'"
            ) from err
