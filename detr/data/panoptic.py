"""Importer from COCO panoptic into the canonical COCO layout (see :mod:`detr.data.formats`).

A COCO panoptic source, per split: a json with ``images`` [{id, file_name, width, height}],
``annotations`` [{image_id, file_name (a PNG), segments_info: [{id, category_id, iscrowd,
bbox, area}]}] and ``categories`` [{id, name, supercategory, isthing}]; and a folder of PNG
segment maps where a pixel's segment id is ``R + 256 * G + 256**2 * B`` (0: void).

It becomes the canonical instance form: one annotation per segment, with ``segmentation`` the
compressed RLE of the segment's pixels (``counts`` a string), ``bbox`` the pixels' tight box,
``area`` their count (both measured on the PNG, not copied from ``segments_info``) and
``iscrowd``; categories keep ``isthing``. Stuff segments are ordinary annotations. Segment ids
are per image in the source, so annotation ids are assigned anew.

Checked (FormatError naming the json, image id and PNG): the PNG exists and has the image's
size; every ``segments_info`` id has pixels in the PNG and every non-zero id of the PNG is in
``segments_info`` (once); every category id is in ``categories``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from detr.data.formats import (
    FormatError,
    ImportedDataset,
    Link,
    PathLike,
    Record,
    read_coco_images,
    read_splits,
    write_canonical,
)
from detr.data.masks import mask_bbox, mask_to_rle


def import_coco_panoptic(out_dir: PathLike,
                         sources: Mapping[str, tuple[PathLike, PathLike, PathLike]], *,
                         val_fraction: float = 0.2, seed: int = 0,
                         link: Link = "symlink") -> ImportedDataset:
    """Import COCO panoptic splits; image and category ids are kept.

    ``sources`` maps a split to ``(panoptic_json, png_dir, image_dir)``: either ``"train"``
    and ``"val"`` (their categories must be equal), or a single ``"all"``, split by ratio.
    """
    splits, categories = read_splits(sources, _read_panoptic, val_fraction=val_fraction,
                                     seed=seed)
    return write_canonical(Path(out_dir), splits, categories, link)


def segment_ids(png: Path) -> np.ndarray:
    """The PNG's segment id map: int64 [H, W], ``R + 256 * G + 256**2 * B``."""
    try:
        with Image.open(png) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    except OSError as exc:  # missing, unreadable or not an image
        raise FormatError(f"{png}: cannot read the panoptic PNG: {exc}") from exc
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _read_panoptic(ann_file: PathLike, png_dir: PathLike,
                   image_dir: PathLike) -> tuple[list[Record], list[dict]]:
    path, png_dir = Path(ann_file), Path(png_dir)
    data, records, categories = read_coco_images(path, Path(image_dir))
    known = {c["id"] for c in categories}
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict) or not {"image_id", "file_name"} <= set(ann):
            raise FormatError(f"{path}: annotation {str(ann)[:60]} needs an image_id and a "
                              "file_name (its PNG)")
        record = records.get(ann["image_id"])
        if record is None:
            raise FormatError(f"{path}: annotation of {ann['file_name']}: image_id "
                              f"{ann['image_id']!r} is not in images")
        if record.objects:
            raise FormatError(f"{path}: image id {record.id} has two panoptic annotations")
        record.objects = _segments(path, png_dir / ann["file_name"], ann, record, known)
    return list(records.values()), categories


def _segments(path: Path, png: Path, ann: dict, record: Record, known: set[int]) -> list[dict]:
    """One object per ``segments_info`` entry, measured on the PNG."""
    where = f"{path}: image id {record.id} ({png.name})"
    ids = np.asfortranarray(segment_ids(png))  # masks come out in RLE's (column) order
    if ids.shape != (record.height, record.width):
        raise FormatError(f"{where}: the PNG is {ids.shape[1]}x{ids.shape[0]} (WxH), the image "
                          f"{record.width}x{record.height}")
    infos = ann.get("segments_info")
    if not (isinstance(infos, list)
            and all(isinstance(i, dict) and _is_int(i.get("id")) for i in infos)):
        raise FormatError(f"{where}: segments_info must be a list of {{id (an int), "
                          "category_id, ...}}")
    listed = [i["id"] for i in infos]
    if len(set(listed)) != len(listed):
        raise FormatError(f"{where}: segments_info lists a segment id twice: {listed}")
    masks = [ids == seg_id for seg_id in listed]
    claimed = np.logical_or.reduce([ids == 0, *masks])  # void or listed
    unlisted = np.unique(ids[~claimed])  # no sort of the whole map: usually empty
    if unlisted.size:
        raise FormatError(f"{where}: segment ids in the PNG {unlisted[:10].tolist()} are not in "
                          "segments_info")
    for info, mask in zip(infos, masks, strict=True):
        if not mask.any():
            raise FormatError(f"{where}: segment {info['id']} of segments_info has no pixels in "
                              f"the PNG (its colour: R + 256 G + 256^2 B = {info['id']})")
    return [_segment(where, info, mask, known) for info, mask in zip(infos, masks, strict=True)]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _segment(where: str, info: dict, mask: np.ndarray, known: set[int]) -> dict:
    if info.get("category_id") not in known:
        raise FormatError(f"{where}: segment {info['id']}: category_id "
                          f"{info.get('category_id')!r} is not in categories")
    if info.get("iscrowd", 0) not in (0, 1):
        raise FormatError(f"{where}: segment {info['id']}: iscrowd must be 0 or 1")
    return {"category_id": int(info["category_id"]), "bbox": mask_bbox(mask),
            "area": int(mask.sum()), "iscrowd": int(info.get("iscrowd", 0)),
            "segmentation": mask_to_rle(mask)}
