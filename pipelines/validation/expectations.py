"""The Great Expectations suite over the tables of a canonical COCO dataset.

The tables (``images``, ``annotations``, ``categories``: one row per json record of every
split; columns in :mod:`pipelines.validation.dataset_tables`) come from
:func:`pipelines.validation.dataset_tables.load_tables`.

Every check is one GE expectation on these columns (:func:`build_expectations`), named by its
``meta["name"]``; :func:`run_suites` validates the tables in an ephemeral context and returns one
:class:`ExpectationOutcome` per expectation, with up to ``max_examples`` offending records named
by split + id (+ file_name / image_id / name). Nulls are skipped by GE's column checks: a missing
file is only reported by ``image_file_exists``, not again by the decode and size checks.

Great Expectations is imported inside the functions that need it: importing this module (and
:mod:`pipelines.stages.validate`) does not pay GE's import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detr.data.layout import SPLITS, UNSAFE_FILE_NAME
from pipelines.validation.dataset_tables import DatasetTables

if TYPE_CHECKING:
    from pipelines.params import ValidateConfig

# Columns that identify an offending record in the report.
RECORD_KEYS = {"images": ["split", "id", "file_name"], "annotations": ["split", "id", "image_id"],
               "categories": ["split", "id", "name"]}
_DOCS_SITE = "validation"


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
