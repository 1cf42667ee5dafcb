"""Importer from YOLO into the canonical COCO layout (see :mod:`detr.data.formats`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from detr.data.coco import IMAGE_SUFFIXES
from detr.data.formats import (
    SPLITS,
    FormatError,
    ImportedDataset,
    Link,
    PathLike,
    Record,
    image_size,
    named_categories,
    split_by_ratio,
    write_canonical,
)


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
    return write_canonical(Path(out_dir), records, named_categories(names), link)


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


def _yolo_records(image_dir: Path, label_dir: Path, num_classes: int) -> list[Record]:
    images = {p.relative_to(image_dir).with_suffix("").as_posix(): p
              for p in sorted(image_dir.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES}
    for label in sorted(label_dir.rglob("*.txt")) if label_dir.is_dir() else []:
        if label.relative_to(label_dir).with_suffix("").as_posix() not in images:
            raise FormatError(f"{label}: no image for this label file in {image_dir}")
    records = []
    for key, path in images.items():
        width, height = image_size(path)
        record = Record(path, path.relative_to(image_dir).as_posix(), width, height)
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
