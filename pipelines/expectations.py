"""The Great Expectations suite over a canonical COCO dataset.

The dataset (``annotations/{train,val}.json`` + ``images/{train,val}/``, see
:mod:`detr.data.formats`) is flattened by :func:`load_tables` into three pandas tables, one row
per json record of every split:

- ``images``: split, id, file_name, width, height (declared), num_boxes; file facts computed
  here: exists, decodes, real_width, real_height, sha1, duplicate_in (the other splits holding
  a file with the same bytes; null when none).
- ``annotations``: split, id, image_id, category_id, x, y, w, h (the bbox, null unless it is 4
  numbers), area, iscrowd; derived: image_found, category_found, right_overflow and
  bottom_overflow (px past the image's right/bottom edge), area_ratio (area / (w * h)).
- ``categories``: split, id, name, supercategory; derived: matches_train ((id, name) is in the
  train split's list), train_boxes (non-crowd train boxes), train_fraction, imbalance (largest
  class's train_boxes / this one's).

Every check is one GE expectation on these columns (:func:`build_expectations`), named by its
``meta["name"]``; :func:`run_suites` validates the tables in an ephemeral context and returns one
:class:`ExpectationOutcome` per expectation, with up to ``max_examples`` offending records named
by split + id (+ file_name / image_id / name). Nulls are skipped by GE's column checks: a missing
file is only reported by ``image_file_exists``, not again by the decode and size checks.

Great Expectations is imported inside the functions that need it: the per-image file checks run
in spawned worker processes, which import this module and should not pay GE's import time.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pandas as pd
from PIL import Image

if TYPE_CHECKING:
    from pipelines.params import ValidateConfig

SPLITS = ("train", "val")
TRAIN = "train"
# Columns that identify an offending record in the report.
RECORD_KEYS = {"images": ["split", "id", "file_name"], "annotations": ["split", "id", "image_id"],
               "categories": ["split", "id", "name"]}
# Absolute (POSIX, Windows drive, UNC) paths or a ".." component anywhere.
UNSAFE_FILE_NAME = r"^(?:[/\\]|[A-Za-z]:)|(?:^|[/\\])\.\.(?:[/\\]|$)"
_MIN_PARALLEL = 256  # fewer images than this: checking them in-process beats starting workers
_DOCS_SITE = "validation"


class DatasetLayoutError(ValueError):
    """The dataset folder lacks an annotation file, or one is not a COCO json object."""


@dataclass(frozen=True)
class DatasetTables:
    """The flattened dataset: one DataFrame per COCO record type (columns: module docstring)."""

    images: pd.DataFrame
    annotations: pd.DataFrame
    categories: pd.DataFrame


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's result; ``examples`` are offending records (key columns + value)."""

    name: str
    table: str
    expectation: str  # GE type, e.g. "expect_column_values_to_be_between"
    kwargs: dict[str, Any]
    success: bool
    element_count: int | None
    unexpected_count: int | None
    examples: tuple[dict[str, Any], ...]
    observed: Any = None  # aggregate expectations: what GE measured (e.g. the splits found)
    error: str | None = None


def load_tables(dataset_dir: str | Path, *, workers: int = 2) -> DatasetTables:
    """Flatten ``dataset_dir``'s train and val jsons and check every image file.

    Raises:
        DatasetLayoutError: an annotation file is missing, not JSON, or lacks a list of
            ``images``, ``annotations`` or ``categories``.
    """
    root = Path(dataset_dir)
    raw = {split: _read_split(root, split) for split in SPLITS}
    images = _frame(raw, "images", ["id", "file_name", "width", "height"])
    names = images["file_name"]  # a non-string name is no name (image_file_name_present fails)
    images["file_name"] = names.where(names.map(lambda v: isinstance(v, str) and v != ""), None)
    annotations = _annotation_frame(raw)
    categories = _frame(raw, "categories", ["id", "name", "supercategory"])
    _add_file_facts(images, root, workers)
    _link_annotations(annotations, images, categories)
    images["num_boxes"] = _boxes_per_image(images, annotations)
    _add_category_stats(categories, annotations)
    return DatasetTables(images, annotations, categories)


def _read_split(root: Path, split: str) -> dict[str, list]:
    path = root / "annotations" / f"{split}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetLayoutError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as exc:
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


def _numeric(values: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(values.map(_number_or_none), errors="coerce").astype("float64")
    if numbers.notna().all() and (numbers % 1 == 0).all():
        return numbers.astype("int64")  # plain ints read better in the report
    return numbers


def _number_or_none(value: Any) -> Any:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


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
    if not isinstance(file_name, str) or not file_name or re.search(UNSAFE_FILE_NAME, file_name):
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
    except OSError:
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


def build_expectations(cfg: ValidateConfig) -> dict[str, list]:
    """The suite: table name -> GE expectations, each named by ``meta["name"]``."""
    return {"images": _image_checks(cfg), "annotations": _annotation_checks(cfg),
            "categories": _category_checks(cfg)}


def _image_checks(cfg: ValidateConfig) -> list:
    return [
        *(_required("image", c) for c in ("id", "file_name", "width", "height")),
        _expect("every_split_has_images", "ExpectColumnDistinctValuesToContainSet",
                column="split", value_set=list(SPLITS)),
        _unique("image_ids_unique", "id"),
        _unique("image_file_names_unique", "file_name"),
        _expect("image_file_name_relative", "ExpectColumnValuesToNotMatchRegex",
                column="file_name", regex=UNSAFE_FILE_NAME),
        _between("image_width_positive", "width", min_value=1),
        _between("image_height_positive", "height", min_value=1),
        _is_true("image_file_exists", "exists"),
        _is_true("image_file_decodes", "decodes"),
        _same("image_width_matches_file", "width", "real_width"),
        _same("image_height_matches_file", "height", "real_height"),
        _expect("image_not_in_two_splits", "ExpectColumnValuesToBeNull", column="duplicate_in"),
        _between("boxes_per_image_in_bounds", "num_boxes",
                 min_value=cfg.min_boxes_per_image, max_value=cfg.max_boxes_per_image),
        _between("boxes_per_image_below_num_queries", "num_boxes",
                 max_value=cfg.num_queries, strict_max=True),
    ]


def _annotation_checks(cfg: ValidateConfig) -> list:
    tol, side = cfg.box_tolerance_px, cfg.min_box_side_px
    return [
        *(_required("annotation", c) for c in ("id", "image_id", "category_id", "area", "iscrowd")),
        _expect("annotation_bbox_is_4_numbers", "ExpectColumnValuesToNotBeNull", column="w"),
        _unique("annotation_ids_unique", "id"),
        _is_true("annotation_image_exists", "image_found"),
        _is_true("annotation_category_exists", "category_found"),
        _between("box_width_positive", "w", min_value=side, strict_min=True),
        _between("box_height_positive", "h", min_value=side, strict_min=True),
        _between("box_left_inside_image", "x", min_value=-tol),
        _between("box_top_inside_image", "y", min_value=-tol),
        _between("box_right_inside_image", "right_overflow", max_value=tol),
        _between("box_bottom_inside_image", "bottom_overflow", max_value=tol),
        _between("annotation_area_positive", "area", min_value=0, strict_min=True),
        _between("annotation_area_within_box", "area_ratio", max_value=1 + cfg.area_tolerance),
        _expect("annotation_iscrowd_0_or_1", "ExpectColumnValuesToBeInSet",
                column="iscrowd", value_set=[0, 1]),
    ]


def _category_checks(cfg: ValidateConfig) -> list:
    return [
        _expect("categories_not_empty", "ExpectTableRowCountToBeBetween", min_value=1),
        *(_required("category", c) for c in ("id", "name")),
        _unique("category_ids_unique", "id"),
        _unique("category_names_unique", "name"),
        _is_true("categories_match_train", "matches_train"),
        _between("category_has_train_boxes", "train_boxes",
                 min_value=cfg.min_train_boxes_per_class),
        _between("category_fraction_above_min", "train_fraction",
                 min_value=cfg.min_class_fraction),
        _between("category_imbalance_below_max", "imbalance", max_value=cfg.max_class_imbalance),
    ]


def _expect(name: str, kind: str, **kwargs: Any) -> Any:
    """GE expectation ``kind`` (a class name in ``gx.expectations``), named ``name``."""
    import great_expectations.expectations as gxe

    # meta names the check in our report; notes show the name in the Data Docs suite pages.
    return getattr(gxe, kind)(meta={"name": name}, notes=f"check: {name}", **kwargs)


def _between(name: str, column: str, **bounds: Any) -> Any:
    return _expect(name, "ExpectColumnValuesToBeBetween", column=column, **bounds)


def _is_true(name: str, column: str) -> Any:
    return _expect(name, "ExpectColumnValuesToBeInSet", column=column, value_set=[True])


def _required(table: str, column: str) -> Any:
    return _expect(f"{table}_{column}_present", "ExpectColumnValuesToNotBeNull", column=column)


def _unique(name: str, *columns: str) -> Any:
    return _expect(name, "ExpectCompoundColumnsToBeUnique", column_list=["split", *columns])


def _same(name: str, column_a: str, column_b: str) -> Any:
    return _expect(name, "ExpectColumnPairValuesToBeEqual", column_A=column_a,
                   column_B=column_b, ignore_row_if="either_value_is_missing")


def run_suites(tables: DatasetTables, cfg: ValidateConfig,
               *, docs_dir: Path | None = None) -> list[ExpectationOutcome]:
    """Validate the three tables; outcomes in suite order. Data Docs go to ``docs_dir``."""
    import great_expectations as gx

    context = _ephemeral_context(docs_dir)
    source = context.data_sources.add_pandas("dataset")
    outcomes = []
    for table, expectations in build_expectations(cfg).items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        suite = context.suites.add(gx.ExpectationSuite(name=table, expectations=expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=table, data=batch, suite=suite))
        result_format = {"result_format": "SUMMARY", "partial_unexpected_count": cfg.max_examples,
                         "unexpected_index_column_names": RECORD_KEYS[table]}
        result = definition.run(batch_parameters={"dataframe": getattr(tables, table)},
                                result_format=result_format)
        by_name = {r.expectation_config.meta["name"]: r for r in result.results}
        outcomes += [_outcome(table, by_name[e.meta["name"]], cfg.max_examples)
                     for e in expectations]
    if docs_dir is not None:
        context.build_data_docs(site_names=[_DOCS_SITE])
    return outcomes


def _ephemeral_context(docs_dir: Path | None) -> Any:
    """An in-memory context: no progress bars, no analytics, one docs site (or none)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {} if docs_dir is None else {_DOCS_SITE: {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }}
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(),
                               data_docs_sites=sites, analytics_enabled=False,
                               progress_bars=ProgressBarsConfig(globally=False))
    return gx.get_context(mode="ephemeral", project_config=config)


def _outcome(table: str, result: Any, max_examples: int) -> ExpectationOutcome:
    raw = _json_safe(result.to_json_dict())
    config, details = raw["expectation_config"], raw.get("result") or {}
    examples = details.get("partial_unexpected_index_list")
    if examples is None:  # no row index: the values themselves, or (sets) what is missing
        examples = [{"value": v} for v in details.get("partial_unexpected_list", [])]
        examples += [{"missing": v} for v in details.get("partial_missing_list", [])]
    exception = raw.get("exception_info") or {}
    return ExpectationOutcome(
        name=config["meta"]["name"],
        table=table,
        expectation=config["type"],
        kwargs={k: v for k, v in config["kwargs"].items() if k != "batch_id"},
        success=bool(raw["success"]),
        element_count=details.get("element_count"),
        unexpected_count=details.get("unexpected_count"),
        examples=tuple(examples[:max_examples]),
        observed=details.get("observed_value"),
        error=exception.get("exception_message") if exception.get("raised_exception") else None,
    )


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (they are not JSON)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value
