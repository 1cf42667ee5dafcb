"""Importer from Pascal VOC into the canonical COCO layout (see :mod:`detr.data.formats`)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

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
    return write_canonical(Path(out_dir), splits, named_categories(names), link)


def _read_voc_xml(xml_path: Path, image_dir: Path) -> tuple[Record, list[tuple]]:
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
    return Record(source, file_name, width, height), objects


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


def _voc_record(xml_path: Path, record: Record, objects: list[tuple], ids: dict[str, int],
                difficult: str) -> Record:
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
