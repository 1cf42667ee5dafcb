"""The canonical COCO layout, its writer, and the importer from COCO.

Canonical layout (written here, read by ``validate`` and :mod:`detr.data.coco`)::

    <out>/annotations/{train,val}.json     COCO json
    <out>/images/{train,val}/<file_name>   file_name relative to images/<split>/

Each json holds ``images`` [{id, file_name, width, height}], ``annotations`` [{id, image_id,
category_id, bbox, area, iscrowd}, and ``segmentation`` where the source has one] with ``bbox``
= [x, y, w, h] in absolute pixels (continuous coordinates, origin at the top-left corner of the
image) and ``categories`` [{id, name, supercategory}, and ``isthing`` (1 thing, 0 stuff) where
the source has it]. ``segmentation`` is COCO's: polygons ``[[x1, y1, x2, y2, ...], ...]`` or
an RLE ``{"size": [h, w], "counts": ...}`` (see :mod:`detr.data.masks`), copied as it is (the
validate stage names malformed ones; boxes do not need them); an empty one (``[]``, box-only
exports) is dropped. Other keys of a COCO source (info, licenses) are not kept, nor
is a category that only groups the others (an unused supercategory of all of them, as
labelling tools export it).

The importers (:func:`import_coco` here, :func:`detr.data.voc.import_voc`,
:func:`detr.data.yolo.import_yolo`, :func:`detr.data.panoptic.import_coco_panoptic`) read their
source into :class:`Record` objects and write them with :func:`write_canonical`. Images are
linked, not copied: ``link="symlink"`` (default; absolute links, so the dataset folder may move
but the source may not), ``"hardlink"`` (same file system) or ``"copy"``. Existing targets are
replaced, unless one already is the source file (an in-place import). Sources without a
train/val split are split by :func:`split_by_ratio` (seeded, deterministic). Malformed input
raises :class:`FormatError` naming the file and the record.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from detr.data.layout import SPLITS
from detr.data.masks import has_segmentation

Link = Literal["symlink", "hardlink", "copy"]
PathLike = str | os.PathLike


class FormatError(ValueError):
    """A source dataset is malformed; the message names the file and the record."""


@dataclass(frozen=True)
class ImportedDataset:
    """What an importer wrote: the root and, per split, the number of images and boxes."""

    root: Path
    images: Mapping[str, int]
    annotations: Mapping[str, int]
    categories: tuple[str, ...]  # names, in category id order


@dataclass
class Record:
    """One image to write. ``objects``: dicts with ``category_id``, ``bbox`` [x, y, w, h] in
    absolute pixels, ``iscrowd`` and, when the source gives them, ``id``, ``area`` and
    ``segmentation`` (COCO polygons or RLE)."""

    source: Path
    file_name: str
    width: int
    height: int
    objects: list[dict[str, Any]] = field(default_factory=list)
    id: int | None = None


def split_by_ratio(keys: Sequence[Any], *, val_fraction: float, seed: int) -> dict[str, list]:
    """Split ``keys`` into ``{"train": [...], "val": [...]}``, reproducibly.

    The keys are sorted, shuffled with ``random.Random(seed)``; the first ``round(n *
    val_fraction)`` go to val (at least one when ``val_fraction > 0`` and ``n >= 2``).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = sorted(keys)
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * val_fraction)
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    return {"train": sorted(order[n_val:]), "val": sorted(order[:n_val])}


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as exc:  # missing, unreadable or not an image
        raise FormatError(f"{path}: cannot read the image header: {exc}") from exc


def import_coco(out_dir: PathLike, sources: Mapping[str, tuple[PathLike, PathLike]], *,
                val_fraction: float = 0.2, seed: int = 0,
                link: Link = "symlink") -> ImportedDataset:
    """Import COCO json + image folders; image, annotation and category ids are kept.

    ``sources`` maps a split to ``(annotation_json, image_dir)``, ``file_name`` being relative
    to ``image_dir``: either ``"train"`` and ``"val"``, kept as they are (their categories must
    be equal), or a single ``"all"``, split by ratio.
    """
    splits, categories = read_splits(sources, _read_coco, val_fraction=val_fraction, seed=seed)
    return write_canonical(Path(out_dir), splits, _without_umbrella(categories, splits), link)


def read_splits(sources: Mapping[str, tuple], read: Callable[..., tuple[list[Record], list]],
                *, val_fraction: float, seed: int) -> tuple[dict[str, list[Record]], list]:
    """Records per split and the categories of a COCO-like source: ``read(*sources[split])``
    gives one split's records (with json ids) and categories. ``sources``: ``"train"`` and
    ``"val"`` (categories must be equal), or only ``"all"``, split by ratio on image ids."""
    if set(sources) == {"all"}:
        records, categories = read(*sources["all"])
        by_id = {r.id: r for r in records}
        parts = split_by_ratio(list(by_id), val_fraction=val_fraction, seed=seed)
        return {s: [by_id[i] for i in ids] for s, ids in parts.items()}, categories
    if set(sources) != set(SPLITS):
        raise ValueError(f"sources: keys 'train' and 'val', or only 'all'; got {sorted(sources)}")
    splits, categories = {}, None
    for split in SPLITS:
        splits[split], cats = read(*sources[split])
        if categories is not None and cats != categories:
            raise FormatError(f"{sources[split][0]}: categories differ from the train split's")
        categories = cats
    return splits, categories


def _without_umbrella(categories: list[dict], splits: Mapping[str, list[Record]]) -> list[dict]:
    """``categories`` less an unused one that is every other's supercategory (labelling tools'
    exports, Roboflow's: ``{"id": 0, "name": "cells"}`` above the real classes): as a class it
    would have no boxes."""
    used = {o["category_id"] for records in splits.values() for r in records for o in r.objects}
    for cat in categories:
        others = [c for c in categories if c is not cat]
        if (cat["id"] not in used and others
                and all(c["supercategory"] == cat["name"] for c in others)):
            return others
    return categories


def _read_coco(ann_file: PathLike, image_dir: PathLike) -> tuple[list[Record], list[dict]]:
    """Records (one per json image, objects attached) and categories of one COCO json."""
    path = Path(ann_file)
    data, records, categories = read_coco_images(path, Path(image_dir))
    known = {c["id"] for c in categories}
    for ann in data.get("annotations", []):
        obj, image_id = _coco_object(path, ann, known)
        if image_id not in records:
            msg = f"{path}: annotation id {ann['id']}: image_id {image_id} is not in images"
            raise FormatError(msg)
        records[image_id].objects.append(obj)
    return list(records.values()), categories


def read_coco_images(path: Path, image_dir: Path) -> tuple[dict, dict[int, Record], list[dict]]:
    """The json object of a COCO-like file, its images as Records by id (no objects yet; the
    files must exist in ``image_dir``) and its categories."""
    data = load_json(path)
    categories = [_coco_category(path, c) for c in data.get("categories", [])]
    records: dict[int, Record] = {}
    for im in data.get("images", []):
        record = _coco_image(path, image_dir, im)
        if record.id in records:
            raise FormatError(f"{path}: image id {record.id} appears twice")
        records[record.id] = record
    return data, records, categories


def load_json(path: Path) -> dict:
    """The JSON object in ``path``; FormatError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: annotation file not found") from exc
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a COCO object with images/annotations/categories")
    return data


def _coco_category(path: Path, cat: dict) -> dict:
    """A COCO category of ``path`` as written: id, name, supercategory (and isthing)."""
    if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
        raise FormatError(f"{path}: category {cat!r} needs an id and a name")
    out = {"id": int(cat["id"]), "name": str(cat["name"]),
           "supercategory": str(cat.get("supercategory", "object"))}
    if "isthing" in cat:
        if cat["isthing"] not in (0, 1):
            raise FormatError(f"{path}: category {cat['id']}: isthing must be 0 or 1, got "
                              f"{cat['isthing']!r}")
        out["isthing"] = int(cat["isthing"])
    return out


def _coco_image(path: Path, image_dir: Path, im: dict) -> Record:
    """The Record of a COCO ``images`` entry of ``path`` (no objects yet); the file must exist."""
    if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
        raise FormatError(f"{path}: image {im!r} needs an id and a file_name")
    source = image_dir / im["file_name"]
    if not source.is_file():
        raise FormatError(f"{path}: image id {im['id']}: file {source} not found")
    if im.get("width") and im.get("height"):
        width, height = int(im["width"]), int(im["height"])
    else:
        width, height = image_size(source)
    return Record(source, Path(im["file_name"]).as_posix(), width, height, id=int(im["id"]))


def _coco_object(path: Path, ann: Any, categories: set[int]) -> tuple[dict, int]:
    if not isinstance(ann, dict) or "id" not in ann or "image_id" not in ann:
        raise FormatError(f"{path}: annotation {ann!r} needs an id and an image_id")
    where = f"{path}: annotation id {ann['id']}"
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise FormatError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    if ann.get("category_id") not in categories:
        raise FormatError(f"{where}: category_id {ann.get('category_id')!r} is not in categories")
    obj = {"id": int(ann["id"]), "category_id": int(ann["category_id"]), "bbox": bbox,
           "iscrowd": int(ann.get("iscrowd", 0))}
    if "area" in ann:
        obj["area"] = ann["area"]
    if has_segmentation(ann):  # kept as it is: validate reports a malformed one by name
        obj["segmentation"] = ann["segmentation"]
    return obj, ann["image_id"]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def named_categories(names: Sequence[str]) -> list[dict]:
    """COCO categories with ids 1..K in the order of ``names``."""
    return [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(names)]


def write_canonical(out_dir: Path, splits: Mapping[str, list[Record]], categories: list[dict],
                    link: Link) -> ImportedDataset:
    """Link the images and write one COCO json per split; ids are assigned where missing."""
    if link not in ("symlink", "hardlink", "copy"):
        raise ValueError(f"link must be 'symlink', 'hardlink' or 'copy', got {link!r}")
    next_image, next_ann = 1, 1
    images, annotations = {}, {}
    for split in SPLITS:
        records = splits.get(split, [])
        coco, next_image, next_ann = _coco_json(records, categories, next_image, next_ann)
        for record in records:
            _link(record.source, out_dir / "images" / split / record.file_name, link)
        (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
        (out_dir / "annotations" / f"{split}.json").write_text(json.dumps(coco))
        images[split], annotations[split] = len(coco["images"]), len(coco["annotations"])
    names = tuple(c["name"] for c in sorted(categories, key=lambda c: c["id"]))
    return ImportedDataset(out_dir, images, annotations, names)


def _coco_json(records, categories, next_image: int, next_ann: int) -> tuple[dict, int, int]:
    images, annotations = [], []
    for record in records:
        image_id = record.id if record.id is not None else next_image
        next_image = max(next_image, image_id) + 1
        images.append({"id": image_id, "file_name": record.file_name,
                       "width": record.width, "height": record.height})
        for obj in record.objects:
            ann_id = obj.get("id", next_ann)
            next_ann = max(next_ann, ann_id) + 1
            x, y, w, h = obj["bbox"]
            ann = {"id": ann_id, "image_id": image_id, "category_id": obj["category_id"],
                   "bbox": [x, y, w, h], "area": obj.get("area", w * h),
                   "iscrowd": obj["iscrowd"]}
            if "segmentation" in obj:
                ann["segmentation"] = obj["segmentation"]
            annotations.append(ann)
    coco = {"images": images, "annotations": annotations, "categories": categories}
    return coco, next_image, next_ann


def _link(source: Path, target: Path, mode: Link) -> None:
    """Make ``target`` a symlink, hard link or copy of ``source``, replacing what is there."""
    real = source.resolve()  # before touching target: in an in-place import they may coincide
    if target.exists() and not target.is_symlink() and os.path.samefile(target, real):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    if mode == "symlink":
        target.symlink_to(real)
    elif mode == "hardlink":
        try:
            os.link(real, target)
        except OSError as exc:
            msg = (f"cannot hard-link {real} -> {target} ({exc}): another file system? Keep the "
                   "source on the dataset's file system, or use link='symlink' (or 'copy')")
            raise OSError(msg) from exc
    else:
        shutil.copyfile(real, target)
