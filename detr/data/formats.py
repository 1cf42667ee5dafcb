"""Importers from COCO, Pascal VOC and YOLO into the canonical COCO layout.

Canonical layout (written here, read by ``validate`` and :mod:`detr.data.coco`)::

    <out>/annotations/{train,val}.json     COCO json
    <out>/images/{train,val}/<file_name>   file_name relative to images/<split>/

Each json holds ``images`` [{id, file_name, width, height}], ``annotations`` [{id, image_id,
category_id, bbox, area, iscrowd}] with ``bbox`` = [x, y, w, h] in absolute pixels (continuous
coordinates, origin at the top-left corner of the image) and ``categories`` [{id, name,
supercategory}]. Other keys of a COCO source (segmentation, info, licenses) are not kept.

Images are linked, not copied: ``link="symlink"`` (default; absolute links, so the dataset
folder may move but the source may not), ``"hardlink"`` (same file system) or ``"copy"``.
Existing targets are replaced, unless one already is the source file (an in-place import).
Sources without a train/val split are split by :func:`split_by_ratio` (seeded, deterministic).
Malformed input raises :class:`FormatError` naming the file and the record.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from PIL import Image

SPLITS = ("train", "val")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
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
class _Record:
    """One image to write. ``objects``: dicts with ``category_id``, ``bbox`` [x, y, w, h] in
    absolute pixels, ``iscrowd`` and, when the source gives them, ``id`` and ``area``."""

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
    if set(sources) == {"all"}:
        records, categories = _read_coco(*sources["all"])
        by_id = {r.id: r for r in records}
        parts = split_by_ratio(list(by_id), val_fraction=val_fraction, seed=seed)
        splits = {s: [by_id[i] for i in ids] for s, ids in parts.items()}
        return _write(Path(out_dir), splits, categories, link)
    if set(sources) != set(SPLITS):
        raise ValueError(f"sources: keys 'train' and 'val', or only 'all'; got {sorted(sources)}")
    splits, categories = {}, None
    for split in SPLITS:
        splits[split], cats = _read_coco(*sources[split])
        if categories is not None and cats != categories:
            raise FormatError(f"{sources[split][0]}: categories differ from the train split's")
        categories = cats
    return _write(Path(out_dir), splits, categories, link)


def _read_coco(ann_file: PathLike, image_dir: PathLike) -> tuple[list[_Record], list[dict]]:
    """Records (one per json image, objects attached) and categories of one COCO json."""
    path, image_dir = Path(ann_file), Path(image_dir)
    data = _load_json(path)
    categories = [_coco_category(path, c) for c in data.get("categories", [])]
    known = {c["id"] for c in categories}
    records = {}
    for im in data.get("images", []):
        record = _coco_image(path, image_dir, im)
        if record.id in records:
            raise FormatError(f"{path}: image id {record.id} appears twice")
        records[record.id] = record
    for ann in data.get("annotations", []):
        obj, image_id = _coco_object(path, ann, known)
        if image_id not in records:
            msg = f"{path}: annotation id {ann['id']}: image_id {image_id} is not in images"
            raise FormatError(msg)
        records[image_id].objects.append(obj)
    return list(records.values()), categories


def _load_json(path: Path) -> dict:
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
    if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
        raise FormatError(f"{path}: category {cat!r} needs an id and a name")
    return {"id": int(cat["id"]), "name": str(cat["name"]),
            "supercategory": str(cat.get("supercategory", "object"))}


def _coco_image(path: Path, image_dir: Path, im: dict) -> _Record:
    if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
        raise FormatError(f"{path}: image {im!r} needs an id and a file_name")
    source = image_dir / im["file_name"]
    if not source.is_file():
        raise FormatError(f"{path}: image id {im['id']}: file {source} not found")
    if im.get("width") and im.get("height"):
        width, height = int(im["width"]), int(im["height"])
    else:
        width, height = image_size(source)
    return _Record(source, Path(im["file_name"]).as_posix(), width, height, id=int(im["id"]))


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
    return obj, ann["image_id"]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def import_voc(out_dir: PathLike, voc_root: PathLike, *, class_names: Sequence[str] | None = None,
               difficult: Literal["crowd", "keep", "drop"] = "crowd", val_fraction: float = 0.2,
               seed: int = 0, link: Link = "symlink") -> ImportedDataset:
    """Import a Pascal VOC folder (``Annotations/*.xml``, ``JPEGImages/``).

    The split comes from ``ImageSets/Main/{train,val}.txt`` when both exist, else by ratio.
    Categories get ids 1..K in the order of ``class_names`` (default: the sorted names found).
    VOC boxes are 1-based inclusive pixel indices: [xmin - 1, ymin - 1, xmax - xmin + 1,
    ymax - ymin + 1] in COCO terms. ``difficult`` objects become ``iscrowd=1`` by default
    ("crowd"): COCOeval then ignores detections on them, as the VOC metric does, and training
    drops crowd boxes; "keep" imports them as ordinary boxes, "drop" leaves them out.
    """
    if difficult not in ("crowd", "keep", "drop"):
        raise ValueError(f"difficult must be 'crowd', 'keep' or 'drop', got {difficult!r}")
    root = Path(voc_root)
    xml_files = {p.stem: p for p in sorted((root / "Annotations").glob("*.xml"))}
    if not xml_files:
        raise FormatError(f"{root / 'Annotations'}: no .xml files")
    parsed = {stem: _read_voc_xml(p, root / "JPEGImages") for stem, p in xml_files.items()}
    names = list(class_names) if class_names is not None else sorted(
        {obj[0] for _, objs in parsed.values() for obj in objs})
    ids = {name: i + 1 for i, name in enumerate(names)}
    records = {stem: _voc_record(xml_files[stem], rec, objs, ids, difficult)
               for stem, (rec, objs) in parsed.items()}
    parts = _voc_split(root, set(records), val_fraction, seed)
    splits = {s: [records[stem] for stem in stems] for s, stems in parts.items()}
    return _write(Path(out_dir), splits, _categories(names), link)


def _read_voc_xml(xml_path: Path, image_dir: Path) -> tuple[_Record, list[tuple]]:
    """The image record (no objects yet) and (name, difficult, xmin, ymin, xmax, ymax) list."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise FormatError(f"{xml_path}: not valid XML: {exc}") from exc
    file_name = (root.findtext("filename") or f"{xml_path.stem}.jpg").strip()
    source = image_dir / file_name
    if not source.is_file():
        raise FormatError(f"{xml_path}: image {source} not found")
    width, height = (_voc_int(root.findtext(f"size/{k}")) for k in ("width", "height"))
    if not (width and height):  # some exports write 0 or leave <size> out
        width, height = image_size(source)
    objects = [_voc_object(xml_path, i, obj) for i, obj in enumerate(root.iter("object"))]
    return _Record(source, file_name, width, height), objects


def _voc_int(text: str | None) -> int:
    return int(float(text)) if text and text.strip().replace(".", "", 1).isdigit() else 0


def _voc_object(xml_path: Path, index: int, obj: ET.Element) -> tuple:
    where = f"{xml_path}: object {index}"
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise FormatError(f"{where}: no <name>")
    coords = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = obj.findtext(f"bndbox/{tag}")
        try:
            coords.append(float(text))
        except (TypeError, ValueError):
            msg = f"{where} ({name}): <bndbox><{tag}> is {text!r}, not a number"
            raise FormatError(msg) from None
    difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true")
    return (name, difficult, *coords)


def _voc_record(xml_path: Path, record: _Record, objects: list[tuple], ids: dict[str, int],
                difficult: str) -> _Record:
    for index, (name, is_difficult, xmin, ymin, xmax, ymax) in enumerate(objects):
        if name not in ids:
            raise FormatError(f"{xml_path}: object {index}: class {name!r} is not in class_names")
        if is_difficult and difficult == "drop":
            continue
        bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
        crowd = int(is_difficult and difficult == "crowd")
        record.objects.append({"category_id": ids[name], "bbox": bbox, "iscrowd": crowd})
    return record


def _voc_split(root: Path, stems: set[str], val_fraction: float, seed: int) -> dict[str, list]:
    lists = {s: root / "ImageSets" / "Main" / f"{s}.txt" for s in SPLITS}
    if not all(p.is_file() for p in lists.values()):
        return split_by_ratio(list(stems), val_fraction=val_fraction, seed=seed)
    parts = {}
    for split, list_file in lists.items():
        names = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        for lineno, stem in enumerate(names, 1):
            if stem not in stems:
                raise FormatError(f"{list_file}:{lineno}: {stem!r} has no Annotations/{stem}.xml")
        parts[split] = names
    return parts


def import_yolo(out_dir: PathLike, yolo_root: PathLike, *,
                class_names: Sequence[str] | None = None, val_fraction: float = 0.2,
                seed: int = 0, link: Link = "symlink") -> ImportedDataset:
    """Import a YOLO folder: ``images/`` and ``labels/`` with one ``.txt`` per image.

    Label lines are ``class cx cy w h``, normalised to [0, 1]; class k becomes category id
    k + 1. Class names: ``class_names``, else ``names`` in ``data.yaml``/``dataset.yaml``
    (list or {index: name}), else ``classes.txt``. Splits: ``images/{train,val}`` (``valid``
    counts as val) when present, else all of ``images/`` split by ratio. An image without a
    label file has no objects; a label file without an image is an error. Image sizes come
    from the image headers.
    """
    root = Path(yolo_root)
    names = list(class_names) if class_names is not None else _yolo_names(root)
    split_dirs = _yolo_split_dirs(root)
    records = {s: _yolo_records(root / "images" / d, root / "labels" / d, len(names))
               for s, d in split_dirs.items()}
    if "all" in records:
        by_name = {r.file_name: r for r in records["all"]}
        parts = split_by_ratio(list(by_name), val_fraction=val_fraction, seed=seed)
        records = {s: [by_name[n] for n in keys] for s, keys in parts.items()}
    return _write(Path(out_dir), records, _categories(names), link)


def _yolo_names(root: Path) -> list[str]:
    for name in ("data.yaml", "dataset.yaml"):
        if (root / name).is_file():
            names = (yaml.safe_load((root / name).read_text()) or {}).get("names")
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names, key=int)]
            if isinstance(names, list):
                return [str(n) for n in names]
            raise FormatError(f"{root / name}: 'names' must be a list or a mapping, got {names!r}")
    if (root / "classes.txt").is_file():
        return [n.strip() for n in (root / "classes.txt").read_text().splitlines() if n.strip()]
    raise FormatError(f"{root}: no class names (data.yaml 'names', classes.txt or class_names)")


def _yolo_split_dirs(root: Path) -> dict[str, str]:
    images = root / "images"
    if not images.is_dir():
        raise FormatError(f"{images}: not a folder")
    found = {s: d for s, d in (("train", "train"), ("val", "val"), ("val", "valid"))
             if (images / d).is_dir()}
    return found if set(found) == set(SPLITS) else {"all": "."}


def _yolo_records(image_dir: Path, label_dir: Path, num_classes: int) -> list[_Record]:
    images = {p.relative_to(image_dir).with_suffix("").as_posix(): p
              for p in sorted(image_dir.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES}
    for label in sorted(label_dir.rglob("*.txt")) if label_dir.is_dir() else []:
        if label.relative_to(label_dir).with_suffix("").as_posix() not in images:
            raise FormatError(f"{label}: no image for this label file in {image_dir}")
    records = []
    for key, path in images.items():
        width, height = image_size(path)
        record = _Record(path, path.relative_to(image_dir).as_posix(), width, height)
        label = label_dir / f"{key}.txt"
        if label.is_file():
            record.objects = _yolo_objects(label, num_classes, width, height)
        records.append(record)
    return records


def _yolo_objects(label: Path, num_classes: int, width: int, height: int) -> list[dict]:
    objects = []
    for lineno, line in enumerate(label.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label}:{lineno}"
        if len(fields) != 5:
            msg = f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}: {line!r}"
            raise FormatError(msg)
        try:
            cls = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise FormatError(f"{where}: not an integer class and 4 numbers: {line!r}") from None
        if not 0 <= cls < num_classes:
            raise FormatError(f"{where}: class index {cls} out of range 0..{num_classes - 1}")
        bbox = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
        bbox = [round(v, 3) for v in bbox]
        objects.append({"category_id": cls + 1, "bbox": bbox, "iscrowd": 0})
    return objects


def _categories(names: Sequence[str]) -> list[dict]:
    return [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(names)]


def _write(out_dir: Path, splits: Mapping[str, list[_Record]], categories: list[dict],
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
            annotations.append({"id": ann_id, "image_id": image_id,
                                "category_id": obj["category_id"], "bbox": [x, y, w, h],
                                "area": obj.get("area", w * h), "iscrowd": obj["iscrowd"]})
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
            msg = f"cannot hard-link {real} -> {target} ({exc}); use link='symlink' or 'copy'"
            raise OSError(msg) from exc
    else:
        shutil.copyfile(real, target)
