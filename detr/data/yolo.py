"""Importer from YOLO into the canonical COCO layout (see :mod:`detr.data.formats`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from detr.data.masks import MaskError, polygons_bbox, segmentation_area


def import_yolo(out_dir: PathLike, yolo_root: PathLike, *,
                class_names: Sequence[str] | None = None, val_fraction: float = 0.2,
                seed: int = 0, link: Link = "symlink") -> ImportedDataset:
    """Import a YOLO folder: ``images/`` and ``labels/`` with one ``.txt`` per image.

    Label lines are ``class cx cy w h``, normalised to [0, 1], or (YOLO segmentation) ``class x1 y1
    x2 y2 x3 y3 ...``, a normalised polygon of >= 3 points: it becomes a COCO polygon
    ``segmentation`` in pixels, with the polygon's enclosing ``bbox`` and its rasterised pixel
    count as ``area``. Class k becomes category id k + 1. Class names: ``class_names``, else
    ``names`` in ``data.yaml``/``dataset.yaml`` (list or {index: name}), else ``classes.txt``.
    Splits: ``images/{train,val}`` (``valid`` counts as val) when present, else all of
    ``images/`` split by ratio. An image without a label file has no objects; a label file
    without an image is an error. Image sizes come from the image headers. (A ``data.yaml``
    naming split folders: :func:`read_data_yaml` and :func:`import_yolo_splits`.)
    """
    root = Path(yolo_root)
    names = list(class_names) if class_names is not None else class_names_in(root)
    splits = {s: (root / "images" / d, root / "labels" / d)
              for s, d in _yolo_split_dirs(root).items()}
    return import_yolo_splits(out_dir, splits, names, val_fraction=val_fraction, seed=seed,
                              link=link)


def import_yolo_splits(out_dir: PathLike, splits: Mapping[str, tuple[PathLike, PathLike]],
                       class_names: Sequence[str], *, val_fraction: float = 0.2, seed: int = 0,
                       link: Link = "symlink") -> ImportedDataset:
    """Import YOLO ``splits``: ``"train"`` and ``"val"``, or only ``"all"`` (split by ratio),
    each ``(image_dir, label_dir)``; labels as in :func:`import_yolo`."""
    records = {s: _yolo_records(Path(i), Path(lbl), len(class_names))
               for s, (i, lbl) in splits.items()}
    if "all" in records:
        by_name = {r.file_name: r for r in records["all"]}
        parts = split_by_ratio(list(by_name), val_fraction=val_fraction, seed=seed)
        records = {s: [by_name[n] for n in keys] for s, keys in parts.items()}
    return write_canonical(Path(out_dir), records, named_categories(class_names), link)


@dataclass(frozen=True)
class DataYaml:
    """An Ultralytics ``data.yaml``: its class names and, per key present (``train``, ``val``,
    ``test``), the image folder it names (resolved as Ultralytics does: relative to ``path:``
    or the yaml's folder; a leading ``../`` that leads nowhere is dropped, for Roboflow's
    exports)."""

    file: Path
    names: tuple[str, ...]
    image_dirs: Mapping[str, Path]


def read_data_yaml(path: PathLike) -> DataYaml:
    """Read ``path``; FormatError naming the file and key when it is not a usable data.yaml."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise FormatError(f"{path}: cannot read it as YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a mapping with train/val/names")
    base = path.parent
    if isinstance(data.get("path"), str) and (base / data["path"]).is_dir():
        base = base / data["path"]
    dirs = {k: _split_dir(path, k, data[k], base) for k in ("train", "val", "test") if data.get(k)}
    dirs = {k: d for k, d in dirs.items() if d is not None}
    return DataYaml(path, tuple(_names(path, data.get("names"))), dirs)


def _split_dir(path: Path, key: str, value: object, base: Path) -> Path | None:
    if not isinstance(value, str) or value.endswith(".txt"):
        raise FormatError(f"{path}: '{key}: {value}' must name one image folder (lists of "
                          "folders or of image files are not supported)")
    folder = base / value
    if not folder.exists() and value.startswith("../"):
        folder = base / value[3:]
    if not folder.is_dir() and key == "test":  # Roboflow's yaml names one it may not ship
        return None
    if not folder.is_dir():
        raise FormatError(f"{path}: '{key}: {value}': no folder {folder}")
    return folder.resolve()


def labels_for(image_dir: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder in the path becomes ``labels``; without
    one, the labels lie beside the images."""
    parts = image_dir.parts
    if "images" not in parts:
        return image_dir
    i = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:i], "labels", *parts[i + 1:])


def class_names_in(root: Path) -> list[str]:
    """Class names of a YOLO folder: ``names`` of data.yaml/dataset.yaml, else classes.txt."""
    for name in ("data.yaml", "dataset.yaml"):
        if (root / name).is_file():
            data = yaml.safe_load((root / name).read_text()) or {}
            return _names(root / name, data.get("names"))
    if (root / "classes.txt").is_file():
        return [n.strip() for n in (root / "classes.txt").read_text().splitlines() if n.strip()]
    raise FormatError(f"{root}: no class names (data.yaml 'names', classes.txt or class_names)")


def _names(path: Path, names: object) -> list[str]:
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise FormatError(f"{path}: 'names' must be a list or a mapping, got {names!r}")


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
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            msg = (f"{where}: expected 5 fields 'class cx cy w h' or a polygon 'class x1 y1 x2 "
                   f"y2 x3 y3 ...' (an odd number >= 7), got {len(fields)}: {line!r}")
            raise FormatError(msg)
        try:
            cls = int(fields[0])
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise FormatError(f"{where}: not an integer class and numbers: {line!r}") from None
        if not 0 <= cls < num_classes:
            raise FormatError(f"{where}: class index {cls} out of range 0..{num_classes - 1}")
        if len(values) == 4:
            objects.append({"category_id": cls + 1, "bbox": _box(values, width, height),
                            "iscrowd": 0})
        else:
            objects.append({"category_id": cls + 1, "iscrowd": 0,
                            **_polygon(values, width, height, where)})
    return objects


def _box(values: list[float], width: int, height: int) -> list[float]:
    cx, cy, w, h = values
    bbox = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
    return [round(v, 3) for v in bbox]


def _polygon(values: list[float], width: int, height: int, where: str) -> dict:
    """A normalised YOLO polygon as COCO ``segmentation``, ``bbox`` and ``area`` in pixels."""
    scale = [width, height] * (len(values) // 2)
    polygon = [round(v * s, 3) for v, s in zip(values, scale, strict=True)]
    try:
        area = segmentation_area([polygon], height, width, where=where)
    except MaskError as err:  # NaN or infinite coordinates
        raise FormatError(str(err)) from None
    return {"segmentation": [polygon], "bbox": [round(v, 3) for v in polygons_bbox([polygon])],
            "area": area}
