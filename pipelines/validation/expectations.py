"""The Great Expectations suite over the tables of a canonical COCO dataset.

The tables (``images``, ``annotations``, ``categories``: one row per json record of every
split; columns in :mod:`pipelines.validation.dataset_tables`; and ``masks``, one row per
annotation with a ``segmentation``, when there is one) come from
:func:`pipelines.validation.dataset_tables.load_tables`. The masks' checks are in
:mod:`pipelines.validation.mask_checks`; a box-only dataset has no masks table and no mask
checks.

Every check is one GE expectation on these columns (:func:`build_expectations`), named by its
``meta["name"]``; :func:`run_suites` validates the tables in an ephemeral context and returns one
:class:`ExpectationOutcome` per expectation, with up to ``max_examples`` offending records named
by split + id (+ file_name / image_id / name). Nulls are skipped by GE's column checks: a missing
file is only reported by ``image_file_exists``, not again by the decode and size checks.

Great Expectations is imported inside the functions that need it: importing this module (and
:mod:`pipelines.stages.validate`) does not pay GE's import time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detr.data.layout import SPLITS, UNSAFE_FILE_NAME
from pipelines.validation.checks import (
    between,
    expect,
    is_true,
    required,
    round_up,
    same,
    unique,
)
from pipelines.validation.dataset_tables import DatasetTables
from pipelines.validation.mask_checks import (
    MASK_DATA_FIXES,
    MASK_PARAM_FIXES,
    mask_checks,
)
from pipelines.validation.mask_checks import RECORD_KEYS as MASK_RECORD_KEYS

if TYPE_CHECKING:
    from pipelines.params import ValidateConfig

# Columns that identify an offending record in the report.
RECORD_KEYS = {"images": ["split", "id", "file_name"], "annotations": ["split", "id", "image_id"],
               "categories": ["split", "id", "name"], "masks": MASK_RECORD_KEYS}
_DOCS_SITE = "validation"
_Fix = Callable[[DatasetTables, "ValidateConfig"], str]  # tables, params -> how to fix


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
    fix: str | None = None  # failed: the params key and a value that passes, or what to fix


def build_expectations(cfg: ValidateConfig, *, masks: bool = False) -> dict[str, list]:
    """The suite: table name -> GE expectations, each named by ``meta["name"]``; with
    ``masks``, the masks table's too."""
    suite = {"images": _image_checks(cfg), "annotations": _annotation_checks(cfg),
             "categories": _category_checks(cfg)}
    return {**suite, "masks": mask_checks(cfg)} if masks else suite


def _image_checks(cfg: ValidateConfig) -> list:
    return [
        *(required("image", c) for c in ("id", "file_name", "width", "height")),
        expect("every_split_has_images", "ExpectColumnDistinctValuesToContainSet",
                column="split", value_set=list(SPLITS)),
        unique("image_ids_unique", "id"),
        unique("image_file_names_unique", "file_name"),
        expect("image_file_name_relative", "ExpectColumnValuesToNotMatchRegex",
                column="file_name", regex=UNSAFE_FILE_NAME),
        between("image_width_positive", "width", min_value=1),
        between("image_height_positive", "height", min_value=1),
        is_true("image_file_exists", "exists"),
        is_true("image_file_decodes", "decodes"),
        same("image_width_matches_file", "width", "real_width"),
        same("image_height_matches_file", "height", "real_height"),
        expect("image_not_in_two_splits", "ExpectColumnValuesToBeNull", column="duplicate_in"),
        between("boxes_per_image_in_bounds", "num_boxes",
                 min_value=cfg.min_boxes_per_image, max_value=cfg.max_boxes_per_image),
    ] + ([] if cfg.num_queries is None else [  # None: resolved from the data at training
        between("boxes_per_image_below_num_queries", "num_boxes",
                 max_value=cfg.num_queries, strict_max=True)])


def _annotation_checks(cfg: ValidateConfig) -> list:
    tol, side = cfg.box_tolerance_px, cfg.min_box_side_px
    return [
        *(required("annotation", c) for c in ("id", "image_id", "category_id", "area", "iscrowd")),
        expect("annotation_bbox_is_4_numbers", "ExpectColumnValuesToNotBeNull", column="w"),
        unique("annotation_ids_unique", "id"),
        is_true("annotation_image_exists", "image_found"),
        is_true("annotation_category_exists", "category_found"),
        between("box_width_positive", "w", min_value=side, strict_min=True),
        between("box_height_positive", "h", min_value=side, strict_min=True),
        between("box_left_inside_image", "x", min_value=-tol),
        between("box_top_inside_image", "y", min_value=-tol),
        between("box_right_inside_image", "right_overflow", max_value=tol),
        between("box_bottom_inside_image", "bottom_overflow", max_value=tol),
        between("annotation_area_positive", "area", min_value=0, strict_min=True),
        between("annotation_area_within_box", "area_ratio", max_value=1 + cfg.area_tolerance),
        expect("annotation_iscrowd_0_or_1", "ExpectColumnValuesToBeInSet",
                column="iscrowd", value_set=[0, 1]),
    ]


def _category_checks(cfg: ValidateConfig) -> list:
    return [
        expect("categories_not_empty", "ExpectTableRowCountToBeBetween", min_value=1),
        *(required("category", c) for c in ("id", "name")),
        unique("category_ids_unique", "id"),
        unique("category_names_unique", "name"),
        is_true("categories_match_train", "matches_train"),
        between("category_has_train_boxes", "train_boxes",
                 min_value=cfg.min_train_boxes_per_class),
        between("category_fraction_above_min", "train_fraction",
                 min_value=cfg.min_class_fraction),
        between("category_imbalance_below_max", "imbalance", max_value=cfg.max_class_imbalance),
    ]


def run_suites(tables: DatasetTables, cfg: ValidateConfig,
               *, docs_dir: Path | None = None) -> list[ExpectationOutcome]:
    """Validate the three tables; outcomes in suite order. Data Docs go to ``docs_dir``."""
    import great_expectations as gx

    context = _ephemeral_context(docs_dir)
    source = context.data_sources.add_pandas("dataset")
    outcomes = []
    for table, expectations in build_expectations(cfg, masks=tables.masks is not None).items():
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
    outcomes = [o if o.success else replace(o, fix=how_to_fix(o.name, tables, cfg))
                for o in outcomes]
    if docs_dir is not None:
        context.build_data_docs(site_names=[_DOCS_SITE])
    return outcomes


def how_to_fix(name: str, tables: DatasetTables, cfg: ValidateConfig) -> str:
    """What makes the failed expectation ``name`` pass: for a bound set in params, the params
    key and a value that passes, computed from the data (and the records to fix where it is
    a defect too); for a data defect, what to fix in the listed records."""
    if name in _PARAM_FIXES:
        try:
            return _PARAM_FIXES[name](tables, cfg)
        except (ValueError, OverflowError):  # NaN or infinite values (JSON allows them)
            return "fix the data: the listed records hold values no bound passes (NaN, inf)"
    if name.endswith("_present"):  # <table>_<column>_present
        column = name.removesuffix("_present").split("_", 1)[1]
        return f"fix the data: give the listed records a valid '{column}'"
    return "fix the data: " + _DATA_FIXES.get(name, "correct or remove the listed records")


def _down(value: float) -> str:
    return f"{math.floor(value * 10000) / 10000:g}"


def _boxes_in_bounds(tables: DatasetTables, cfg: ValidateConfig) -> str:
    counts = tables.images["num_boxes"]
    most, least = int(counts.max()), int(counts.min())
    fixes = []
    if most > cfg.max_boxes_per_image:
        fixes.append(f"set validate.max_boxes_per_image >= {most} (the most boxes in one image "
                     f"is {most})")
    if least < cfg.min_boxes_per_image:
        fixes.append(f"set validate.min_boxes_per_image <= {least} (the fewest boxes in one "
                     f"image is {least})")
    return " and ".join(fixes)


def _boxes_below_queries(tables: DatasetTables, cfg: ValidateConfig) -> str:
    most = int(tables.images["num_boxes"].max())
    return (f"set model.num_queries >= {most + 1} (the most boxes in one image is {most}; "
            "validate.num_queries, if set, too)")


def _box_side(column: str, word: str) -> _Fix:
    def fix(tables: DatasetTables, cfg: ValidateConfig) -> str:
        if float(tables.annotations[column].min()) <= 0:
            return f"fix the data: the listed boxes need a {word} > 0 (bbox [x, y, w, h])"
        sides = tables.annotations[["w", "h"]]
        smallest = float(sides[sides > 0].min().min())  # one bound for widths and heights
        return (f"set validate.min_box_side_px < {smallest:g} (the smallest box side is "
                f"{smallest:g} px), or fix the listed boxes")
    return fix


def _overflow(column: str, sign: float, where: str) -> _Fix:
    def fix(tables: DatasetTables, cfg: ValidateConfig) -> str:
        most = float((sign * tables.annotations[column]).max())
        return (f"fix the listed boxes (up to {most:g} px {where} the image), or set "
                f"validate.box_tolerance_px >= {round_up(most)}")
    return fix


def _area_within_box(tables: DatasetTables, cfg: ValidateConfig) -> str:
    excess = float(tables.annotations["area_ratio"].max()) - 1
    return (f"fix the listed areas (at most w * h), or set validate.area_tolerance >= "
            f"{round_up(excess)} (the largest area is {excess + 1:.4g} x w * h)")


def _category_bound(key: str, column: str, what: str,
                    larger: bool) -> _Fix:
    def fix(tables: DatasetTables, cfg: ValidateConfig) -> str:
        values = tables.categories[column]  # per category id; the same in every split
        value = float(values.max() if larger else values.min())
        bound = f">= {round_up(value)}" if larger else f"<= {_down(value)}"
        return (f"add train boxes of the listed categories (or drop the categories), or set "
                f"validate.{key} {bound} ({what} {value:.4g})")
    return fix


_PARAM_FIXES: dict[str, _Fix] = {
    "boxes_per_image_in_bounds": _boxes_in_bounds,
    "boxes_per_image_below_num_queries": _boxes_below_queries,
    "box_width_positive": _box_side("w", "width"),
    "box_height_positive": _box_side("h", "height"),
    "box_left_inside_image": _overflow("x", -1.0, "left of"),
    "box_top_inside_image": _overflow("y", -1.0, "above"),
    "box_right_inside_image": _overflow("right_overflow", 1.0, "right of"),
    "box_bottom_inside_image": _overflow("bottom_overflow", 1.0, "below"),
    "annotation_area_within_box": _area_within_box,
    "category_has_train_boxes": _category_bound(
        "min_train_boxes_per_class", "train_boxes", "the fewest train boxes of a class:", False),
    "category_fraction_above_min": _category_bound(
        "min_class_fraction", "train_fraction", "the rarest class's share of train boxes:", False),
    "category_imbalance_below_max": _category_bound(
        "max_class_imbalance", "imbalance", "largest class / smallest:", True),
    **MASK_PARAM_FIXES,
    "every_split_has_images": lambda tables, cfg: (
        "both splits need images: give the source a train and a val split, or one split and "
        "prepare.val_fraction > 0 (e.g. 0.2) to divide it"),
}

# Data defects: no params key makes them pass.
_DATA_FIXES = {
    "image_ids_unique": "give the listed images ids unique within their split",
    "image_file_names_unique": "give the listed images file_names unique within their split",
    "image_file_name_relative": "make the listed file_names relative to images/<split>/ "
                                "(no absolute path, no '..')",
    "image_width_positive": "give the listed images their width in px (> 0)",
    "image_height_positive": "give the listed images their height in px (> 0)",
    "image_file_exists": "add the listed image files under images/<split>/, or remove their "
                         "records",
    "image_file_decodes": "replace the listed image files (they do not decode), or remove "
                          "their records",
    "image_width_matches_file": "set the listed images' width to the file's (or re-export it)",
    "image_height_matches_file": "set the listed images' height to the file's (or re-export it)",
    "image_not_in_two_splits": "remove the listed images from one split (the same file is in "
                               "train and val: val would measure training images)",
    "annotation_bbox_is_4_numbers": "give the listed annotations a bbox of 4 numbers "
                                    "[x, y, w, h]",
    "annotation_ids_unique": "give the listed annotations ids unique within their split",
    "annotation_image_exists": "point the listed annotations' image_id at an image of their "
                               "split, or remove them",
    "annotation_category_exists": "point the listed annotations' category_id at a category of "
                                  "their split, or remove them",
    "annotation_area_positive": "give the listed annotations an area > 0 (w * h for a box)",
    "annotation_iscrowd_0_or_1": "set the listed annotations' iscrowd to 0 or 1",
    "categories_not_empty": "add the categories list ({id, name}) to the annotation files",
    "category_ids_unique": "give the listed categories ids unique within their split",
    "category_names_unique": "give the listed categories names unique within their split",
    "categories_match_train": "give the listed categories the same id and name as in train",
    **MASK_DATA_FIXES,
}


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
