"""The canonical COCO dataset flattened into pandas tables, with the per-image file checks.

The dataset (``annotations/{train,val}.json`` + ``images/{train,val}/``, see
:mod:`detr.data.formats`) is flattened by :func:`load_tables` into three pandas tables, one row
per json record of every split:

- ``images``: split, id, file_name, width, height (declared), num_boxes; file facts computed
  here (:func:`check_files`): exists, decodes, real_width, real_height, sha1, duplicate_in (the
  other splits holding a file with the same bytes; null when none).
- ``annotations``: split, id, image_id, category_id, x, y, w, h (the bbox, null unless it is 4
  numbers), area, iscrowd; derived: image_found, category_found, right_overflow and
  bottom_overflow (px past the image's right/bottom edge), area_ratio (area / (w * h)).
- ``categories``: split, id, name, supercategory; derived: matches_train ((id, name) is in the
  train split's list), train_boxes (non-crowd train boxes), train_fraction, imbalance (largest
  class's train_boxes / this one's).
- ``masks`` (None when no annotation has a ``segmentation``, or ``masks=False``): one row per
  annotation, its mask measured (columns in :mod:`pipelines.validation.mask_tables`).

The Great Expectations suite over these columns is
:mod:`pipelines.validation.expectations`. This module
does not import Great Expectations: the per-image file checks run in spawned worker processes,
which import this module and should not pay GE's import time.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from PIL import Image

from detr.data.layout import SPLITS, is_unsafe_file_name
from pipelines.validation.mask_tables import mask_frame

TRAIN = "train"
_MIN_PARALLEL = 256  # fewer images than this: checking them in-process beats starting workers


class DatasetLayoutError(ValueError):
    """The dataset folder lacks an annotation file, or one is not a COCO json object."""


@dataclass(frozen=True)
class DatasetTables:
    """The flattened dataset: one DataFrame per COCO record type (columns: module docstring)."""

    images: pd.DataFrame
    annotations: pd.DataFrame
    categories: pd.DataFrame
    masks: pd.DataFrame | None = None  # None: no annotation has a segmentation


def load_tables(dataset_dir: str | Path, *, workers: int = 2, masks: bool = True
                ) -> DatasetTables:
    """Flatten ``dataset_dir``'s train and val jsons and check every image file; with
    ``masks`` (a task that trains on masks), measure the segmentations too.

    Raises:
        DatasetLayoutError: an annotation file is missing, not JSON, or lacks a list of
            ``images``, ``annotations`` or ``categories``.
    """
    root = Path(dataset_dir)
    raw = {split: _read_split(root, split) for split in SPLITS}
    images = _frame(raw, "images", ["id", "file_name", "width", "height"])
    # A non-string name is no name (the *_present expectation fails and names the record).
    images["file_name"] = _strings(images["file_name"])
    annotations = _annotation_frame(raw)
    categories = _frame(raw, "categories", ["id", "name", "supercategory"])
    categories["name"] = _strings(categories["name"])
    categories["supercategory"] = _strings(categories["supercategory"])
    _add_file_facts(images, root, workers)
    _link_annotations(annotations, images, categories)
    images["num_boxes"] = _boxes_per_image(images, annotations)
    _add_category_stats(categories, annotations)
    return DatasetTables(images, annotations, categories,
                         mask_frame(raw, images) if masks else None)


def _read_split(root: Path, split: str) -> dict[str, list]:
    path = root / "annotations" / f"{split}.json"
    try:
        data = json.loads(path.read_bytes())  # bytes: UTF-8/16/32 detected as JSON allows
    except FileNotFoundError:
        raise DatasetLayoutError(f"{path}: annotation file not found") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DatasetLayoutError(f"{path}: not valid JSON: {exc}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DatasetLayoutError(f"{path}: '{key}' must be a list of records")
    return data


def _frame(raw: dict[str, dict], key: str, columns: list[str]) -> pd.DataFrame:
    """One row per record of ``raw[split][key]``; numeric columns coerced (non-numbers: null)."""
    rows = [(split, *(_field(r, c) for c in columns)) for split in SPLITS for r in raw[split][key]]
    frame = pd.DataFrame(rows, columns=["split", *columns], dtype=object)
    for column in columns:
        if column in ("id", "image_id", "category_id", "width", "height", "area", "iscrowd"):
            frame[column] = _numeric(frame[column])
    return frame


def _field(record: Any, column: str) -> Any:
    return record.get(column) if isinstance(record, dict) else None


def _strings(values: pd.Series) -> pd.Series:
    """Non-empty strings kept, anything else (numbers, lists, "", text that is not valid
    Unicode, such as a lone surrogate escaped in the JSON) null."""
    return values.where(values.map(_is_text), None)


def _is_text(value: Any) -> bool:
    if not isinstance(value, str) or value == "":
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _numeric(values: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(values.map(_number_or_none), errors="coerce").astype("float64")
    exact = numbers.abs() <= 2**53  # beyond, float64 holds no exact int (and int64 overflows)
    if numbers.notna().all() and exact.all() and (numbers % 1 == 0).all():
        return numbers.astype("int64")  # plain ints read better in the report
    return numbers


def _number_or_none(value: Any) -> Any:
    """``value`` if it is a number a float can hold (not a bool, not a 400-digit int)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        float(value)
    except OverflowError:
        return None
    return value


def _annotation_frame(raw: dict[str, dict]) -> pd.DataFrame:
    columns = ["id", "image_id", "category_id", "area", "iscrowd"]
    frame = _frame(raw, "annotations", columns)
    boxes = [_bbox(_field(r, "bbox")) for split in SPLITS for r in raw[split]["annotations"]]
    bbox = pd.DataFrame(boxes, columns=["x", "y", "w", "h"], dtype="float64")
    return pd.concat([frame, bbox], axis=1)


def _bbox(value: Any) -> list[float | None]:
    numbers = isinstance(value, list) and all(_number_or_none(v) is not None for v in value)
    if numbers and len(value) == 4:
        return value
    return [None] * 4


def _add_file_facts(images: pd.DataFrame, root: Path, workers: int) -> None:
    names = zip(images["split"], images["file_name"], strict=True)
    paths = [_safe_path(root / "images" / split, name) for split, name in names]
    facts = pd.DataFrame(check_files(paths, workers=workers), index=images.index, dtype=object,
                         columns=["exists", "decodes", "real_width", "real_height", "sha1"])
    images[facts.columns] = facts
    images["duplicate_in"] = _duplicate_in(images)


def _safe_path(split_dir: Path, file_name: Any) -> str | None:
    """The file's path, or None when the name is not a relative path inside ``split_dir``."""
    if not isinstance(file_name, str) or not file_name or is_unsafe_file_name(file_name):
        return None
    return str(split_dir / PurePosixPath(file_name))


def check_files(paths: Sequence[str | None], *, workers: int = 2) -> list[tuple]:
    """``(exists, decodes, width, height, sha1)`` per path (all None for a None path).

    Each file is read once: SHA-1 of its bytes, then a full decode (``Image.load``) for the real
    size. Uses ``workers`` spawned processes when there are many files.
    """
    if workers <= 1 or len(paths) < _MIN_PARALLEL:
        return [_check_file(p) for p in paths]
    chunk = max(1, len(paths) // (workers * 16))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(_check_file, paths, chunksize=chunk)


def _check_file(path: str | None) -> tuple:
    if path is None:
        return (None,) * 5
    try:
        data = Path(path).read_bytes()
    except (OSError, ValueError):  # ValueError: a NUL byte or a lone surrogate in the name
        return (False, None, None, None, None)
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return (True, False, None, None, sha1)
    return (True, True, width, height, sha1)


def _duplicate_in(images: pd.DataFrame) -> pd.Series:
    """Per image: the other splits (comma-joined) holding a file with the same bytes, or None."""
    splits_by_hash = images.dropna(subset=["sha1"]).groupby("sha1")["split"].agg(frozenset)
    others = [
        ",".join(sorted(splits_by_hash[h] - {s})) or None if isinstance(h, str) else None
        for s, h in zip(images["split"], images["sha1"], strict=True)
    ]
    return pd.Series(others, index=images.index, dtype=object)


def _link_annotations(ann: pd.DataFrame, images: pd.DataFrame, categories: pd.DataFrame) -> None:
    """Add image_found, category_found, right/bottom_overflow and area_ratio to ``ann``."""
    keys = ["split", "image_id"]
    declared = images.drop_duplicates(["split", "id"]).rename(columns={"id": "image_id"})
    declared = declared.set_index(keys)[["width", "height"]]
    sizes = ann[keys].join(declared, on=keys)
    ann["image_found"] = _pairs_in(ann, keys, images, ["split", "id"])
    ann["category_found"] = _pairs_in(ann, ["split", "category_id"], categories, ["split", "id"])
    ann["right_overflow"] = ann["x"] + ann["w"] - sizes["width"]
    ann["bottom_overflow"] = ann["y"] + ann["h"] - sizes["height"]
    box_area = (ann["w"] * ann["h"]).where(lambda a: a > 0)
    ann["area_ratio"] = ann["area"] / box_area


def _pairs_in(left: pd.DataFrame, left_keys, right: pd.DataFrame, right_keys) -> pd.Series:
    index = pd.MultiIndex.from_frame(right[right_keys].astype(object))
    found = pd.MultiIndex.from_frame(left[left_keys].astype(object)).isin(index)
    return pd.Series(found, index=left.index, dtype=bool)


def _boxes_per_image(images: pd.DataFrame, ann: pd.DataFrame) -> pd.Series:
    counts = ann.groupby(["split", "image_id"]).size()
    keys = pd.MultiIndex.from_frame(images[["split", "id"]].astype(object))
    return pd.Series(counts.reindex(keys, fill_value=0).to_numpy(), index=images.index)


def _add_category_stats(categories: pd.DataFrame, ann: pd.DataFrame) -> None:
    train = categories[categories["split"] == TRAIN]
    categories["matches_train"] = _pairs_in(categories, ["id", "name"], train, ["id", "name"])
    boxes = ann[(ann["split"] == TRAIN) & (ann["iscrowd"] != 1)]
    counts = boxes.groupby("category_id").size()
    train_boxes = categories["id"].map(counts).fillna(0).astype("int64")
    categories["train_boxes"] = train_boxes
    categories["train_fraction"] = train_boxes / max(len(boxes), 1)
    categories["imbalance"] = train_boxes.max() / train_boxes.where(train_boxes > 0)
