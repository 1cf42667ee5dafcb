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
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detr.data.layout import is_unsafe_file_name
from detr.data.masks import (
    MaskError,
    decode_segmentation,
    has_segmentation,
    is_finite_number,
    segmentation_problem,
)

Target = dict[str, Any]
Transforms = Callable[[tv_tensors.Image, Target], tuple[Any, Target]]


# File suffixes read as images where a folder is scanned (YOLO import, `detr.predict`): PIL reads them all.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


class ImageLoadError(OSError):
    """An image listed in the annotations is missing, unreadable or not the size it claims."""


class AnnotationError(ValueError):
    """The annotation file is malformed (e.g. an annotation names an unknown category)."""



def load_coco(ann_file: str | Path) -> COCO:
    """Read a COCO json, check the structure the dataset relies on, index it with pycocotools
    (without its progress prints on stdout).

    Checked, so that a bad file fails here, naming the file, the record and the field, rather
    than deep inside pycocotools or in the middle of a training: ``images``, ``categories``
    (and ``annotations``, if present) are lists of objects; images have a unique int ``id``, a
    ``file_name`` relative to the image folder (no ``..``, not absolute) and, if given, int
    ``width``/``height`` > 0; categories a unique int ``id`` and a string ``name``;
    annotations a unique int ``id``, an ``image_id`` and a ``category_id`` that exist, a
    ``bbox`` of four finite numbers and, if given, ``iscrowd`` 0/1 and a finite ``area``.
    ``segmentation`` is not looked at (boxes do not need it; real datasets hold a few
    degenerate polygons): ``CocoDetection(masks=True)`` checks it.
    Box geometry (zero size, outside the image) is not an error here: such boxes are dropped
    or clamped when an item is read; the pipeline's validate stage reports them.

    Raises:
        FileNotFoundError: ``ann_file`` does not exist (the message names it).
        AnnotationError: not JSON, or not a COCO detection file as above.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        raise AnnotationError(f"{path}: not valid JSON: {err}") from None
    _check_coco(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_coco(data: Any, path: Path) -> None:
    """Raise AnnotationError unless ``data`` has the structure :func:`load_coco` documents."""
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object with 'images', 'annotations' and "
                              f"'categories', got {type(data).__name__}")
    images = _records(data, "images", path)
    image_ids = _unique_ids(images, "images", path)
    for i, image in enumerate(images):
        name = image.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise AnnotationError(f"{path}: image {image['id']} (images[{i}]): file_name must "
                                  f"be a non-empty string, got {_short(name)}")
        if is_unsafe_file_name(name):
            raise AnnotationError(f"{path}: image {image['id']} (images[{i}]): file_name "
                                  f"{_short(name)} must be relative to the image folder, "
                                  f"without '..'")
        for key in ("width", "height"):
            value = image.get(key)
            if key in image and not (_is_int(value) and value > 0):
                raise AnnotationError(f"{path}: image {image['id']} (images[{i}]): {key} must "
                                      f"be a positive integer, got {_short(value)}")
    categories = _records(data, "categories", path)
    category_ids = _unique_ids(categories, "categories", path)
    for i, category in enumerate(categories):
        if not isinstance(category.get("name"), str):
            raise AnnotationError(f"{path}: category {category['id']} (categories[{i}]): name "
                                  f"must be a string, got {_short(category.get('name'))}")
    annotations = _records(data, "annotations", path, required=False)
    _unique_ids(annotations, "annotations", path)
    for i, ann in enumerate(annotations):
        _check_annotation(ann, path, i, image_ids, category_ids)


def _records(data: dict, key: str, path: Path, *, required: bool = True) -> list[dict]:
    if key not in data and not required:
        data[key] = []
    records = data.get(key)
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: '{key}' must be a list of objects, got "
                              f"{type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise AnnotationError(f"{path}: {key}[{i}] must be an object, got "
                                  f"{type(record).__name__} {_short(record)}")
    return records


def _unique_ids(records: list[dict], key: str, path: Path) -> set[int]:
    seen: set[int] = set()
    for i, record in enumerate(records):
        value = record.get("id")
        if not _is_int(value):
            raise AnnotationError(f"{path}: {key}[{i}]: id must be an integer, got "
                                  f"{_short(value)}")
        if value in seen:
            raise AnnotationError(f"{path}: {key}[{i}]: id {value} is used twice")
        seen.add(value)
    return seen


def _check_annotation(ann: dict, path: Path, index: int, image_ids: set[int],
                      category_ids: set[int]) -> None:
    where = f"{path}: annotation {ann['id']} (annotations[{index}])"
    for key, known, table in (("image_id", image_ids, "images"),
                              ("category_id", category_ids, "categories")):
        value = ann.get(key)
        if not _is_int(value) or value not in known:
            raise AnnotationError(f"{where}: {key} {_short(value)} is not in '{table}'")
    where = f"{path}: annotation {ann['id']} of image {ann['image_id']} (annotations[{index}])"
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(is_finite_number, bbox))):
        raise AnnotationError(f"{where}: bbox must be [x, y, w, h], four finite numbers, got "
                              f"{_short(bbox)}")
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        raise AnnotationError(f"{where}: iscrowd must be 0 or 1, got {_short(ann['iscrowd'])}")
    if "area" in ann and not is_finite_number(ann["area"]):
        raise AnnotationError(f"{where}: area must be a finite number, got "
                              f"{_short(ann['area'])}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
    - ``target["masks"]`` (only with ``masks=True``): ``tv_tensors.Mask`` uint8 [N, H, W], row
      i the mask of box i (decoded from the annotation's ``segmentation`` as pycocotools'
      ``annToMask`` does; the same crowd and degenerate-box filtering).

    Raises:
        FileNotFoundError, AnnotationError: (constructor) the json is missing or malformed,
            see :func:`load_coco`; the message names the file, the record and the field.
        ImageLoadError: (``__getitem__``) the image file is missing, unreadable, or its size
            differs from the json's ``width``/``height``; the message names the path and id.
        AnnotationError: (constructor, ``masks=True``) a non-crowd annotation has no
            ``segmentation``, or a malformed one (a polygon of < 3 points); (``__getitem__``)
            one does not decode on its image (an RLE of another size, bad counts); the message
            names the file, annotation id and field.
    """

    def __init__(
        self, image_dir: str | Path, ann_file: str | Path, transforms: Transforms | None = None,
        *, masks: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.masks = masks
        self.coco = load_coco(self.ann_file)
        if masks:
            self._check_segmentations()
        self.ids: list[int] = sorted(self.coco.imgs)
        cats = sorted(self.coco.cats.values(), key=lambda c: int(c["id"]))
        # isthing (0: a stuff class, for panoptic maps) is kept where the json has it
        self.categories: list[dict[str, Any]] = [
            {"id": int(c["id"]), "name": str(c["name"]),
             **({"isthing": int(c["isthing"])} if "isthing" in c else {})} for c in cats
        ]
        self.label_to_category: list[int] = [c["id"] for c in self.categories]
        self.category_to_label: dict[int, int] = {
            cat: label for label, cat in enumerate(self.label_to_category)
        }

    @classmethod
    def from_root(
        cls, root: str | Path, split: str, transforms: Transforms | None = None,
        *, masks: bool = False,
    ) -> CocoDetection:
        """The ``split`` ("train" or "val") of a dataset in the canonical layout under ``root``."""
        root = Path(root)
        return cls(root / "images" / split, root / "annotations" / f"{split}.json", transforms,
                   masks=masks)

    def _check_segmentations(self) -> None:
        """Every non-crowd annotation has a segmentation of the right structure."""
        for ann in self.coco.dataset["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            where = f"{self.ann_file}: annotation {ann['id']} of image {ann['image_id']}"
            if not has_segmentation(ann):
                raise AnnotationError(
                    f"{where}: no segmentation; masks need one per non-crowd annotation (a "
                    f"box-only dataset trains with model.task: detection)")
            problem = segmentation_problem(ann["segmentation"])
            if problem is not None:
                raise AnnotationError(f"{where}: segmentation: {problem}")

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
        boxes, labels, keep = self._boxes_and_labels(anns, canvas_size)
        target = {
            "boxes": boxes,
            "labels": labels,
            "image_id": int(image_id),
            "orig_size": torch.tensor(canvas_size, dtype=torch.int64),
        }
        if self.masks:
            kept = [a for a, k in zip(anns, keep.tolist(), strict=True) if k]
            target["masks"] = self._load_masks(kept, canvas_size)
        return target

    def _load_masks(self, anns: list[dict[str, Any]], canvas_size: tuple[int, int]
                    ) -> tv_tensors.Mask:
        """uint8 [N, H, W], one decoded segmentation per annotation."""
        height, width = canvas_size
        rows = []
        for ann in anns:
            where = f"{self.ann_file}: annotation {ann['id']} of image {ann['image_id']}"
            try:
                rows.append(torch.from_numpy(
                    decode_segmentation(ann["segmentation"], height, width, where=where)))
            except MaskError as err:
                raise AnnotationError(str(err)) from None
        if not rows:
            return tv_tensors.Mask(torch.zeros((0, height, width), dtype=torch.uint8))
        return tv_tensors.Mask(torch.stack(rows))

    def _boxes_and_labels(
        self, anns: list[dict[str, Any]], canvas_size: tuple[int, int]
    ) -> tuple[tv_tensors.BoundingBoxes, torch.Tensor, torch.Tensor]:
        """XYXY boxes clamped to the image, without degenerate ones, their labels, and which
        of ``anns`` were kept (bool [len(anns)])."""
        # load_coco checked every category id and bbox (four finite numbers).
        labels = torch.tensor([self.category_to_label[a["category_id"]] for a in anns],
                              dtype=torch.int64)
        xywh = torch.tensor([[float(v) for v in a["bbox"]] for a in anns],
                            dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(xywh, format="XYWH", canvas_size=canvas_size)
        boxes = F.clamp_bounding_boxes(F.convert_bounding_box_format(boxes, new_format="XYXY"))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return tv_tensors.wrap(boxes[keep], like=boxes), labels[keep], keep
