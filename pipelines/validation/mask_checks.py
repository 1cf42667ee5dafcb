"""The Great Expectations checks of the ``masks`` table, and how to make each pass.

Run by :func:`pipelines.validation.expectations.run_suites` (in the same report as the box
checks) when the dataset has segmentations; columns in :mod:`pipelines.validation.mask_tables`.
Offending records are named by split, annotation id, image id and the image's file_name.

Bounds: ``validate.box_tolerance_px`` (polygon vertices outside the image, as for boxes),
``validate.mask_area_tolerance`` (relative ``area`` mismatch; default
:data:`MASK_AREA_TOLERANCE`) and ``validate.mask_box_tolerance_px`` (bbox edges off the mask's
box beyond 10% of its longer side; default :data:`MASK_BOX_TOLERANCE_PX`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipelines.validation.checks import between, is_true, round_up
from pipelines.validation.dataset_tables import DatasetTables

if TYPE_CHECKING:
    from pipelines.params import ValidateConfig

MASK_AREA_TOLERANCE = 0.1
MASK_BOX_TOLERANCE_PX = 2.0
RECORD_KEYS = ["split", "id", "image_id", "file_name"]


def mask_bounds(cfg: ValidateConfig) -> tuple[float, float]:
    """``(mask_area_tolerance, mask_box_tolerance_px)`` of ``cfg``, the defaults where the
    params do not have the keys (yet)."""
    return (getattr(cfg, "mask_area_tolerance", MASK_AREA_TOLERANCE),
            getattr(cfg, "mask_box_tolerance_px", MASK_BOX_TOLERANCE_PX))


def mask_checks(cfg: ValidateConfig) -> list:
    """The expectations on the masks table, each named by ``meta["name"]``."""
    area_tolerance, box_tolerance = mask_bounds(cfg)
    return [
        is_true("annotation_has_segmentation", "has_segmentation"),
        is_true("segmentation_polygon_well_formed", "polygon_well_formed"),
        between("segmentation_polygon_inside_image", "polygon_outside_px",
                max_value=cfg.box_tolerance_px),
        is_true("segmentation_rle_decodes", "rle_decodes"),
        is_true("segmentation_rle_size_matches_image", "rle_size_matches_image"),
        between("mask_not_empty", "mask_area", min_value=1),
        between("mask_area_matches_area", "mask_area_error", max_value=area_tolerance),
        between("mask_box_matches_bbox", "mask_box_gap_px", max_value=box_tolerance),
        between("segments_do_not_overlap", "overlap_px", max_value=0),
    ]


def _most(tables: DatasetTables, column: str) -> float:
    return float(tables.masks[column].max())


MASK_PARAM_FIXES: dict[str, Any] = {
    "segmentation_polygon_inside_image": lambda tables, cfg: (
        f"fix the listed polygons' vertices (up to {_most(tables, 'polygon_outside_px'):g} px "
        f"outside the image), or set validate.box_tolerance_px >= "
        f"{round_up(_most(tables, 'polygon_outside_px'))}"),
    "mask_area_matches_area": lambda tables, cfg: (
        f"set the listed annotations' area to their mask's pixel count, or set "
        f"validate.mask_area_tolerance >= {round_up(_most(tables, 'mask_area_error'))} (the "
        f"largest mismatch is {_most(tables, 'mask_area_error'):.4g} x area)"),
    "mask_box_matches_bbox": lambda tables, cfg: (
        f"set the listed annotations' bbox to their mask's box, or set "
        f"validate.mask_box_tolerance_px >= {round_up(_most(tables, 'mask_box_gap_px'))}"),
}

MASK_DATA_FIXES = {
    "annotation_has_segmentation": (
        "give the listed annotations a segmentation (polygons or RLE), or remove them; or train "
        "boxes only (model.task: detection)"),
    "segmentation_polygon_well_formed": (
        "give the listed annotations' segmentation polygons of an even number (>= 6) of "
        "finite coordinates [[x1, y1, x2, y2, x3, y3, ...], ...], or an RLE "
        "{'size': [h, w], 'counts': ...}"),
    "segmentation_rle_decodes": (
        "re-export the listed annotations' segmentation RLE: its counts must decode to run "
        "lengths summing to size[0] x size[1]"),
    "segmentation_rle_size_matches_image": (
        "the listed annotations' segmentation RLE size must be their image's [height, width]: "
        "re-export them for the image (or fix the image's width/height)"),
    "mask_not_empty": "give the listed annotations a segmentation with pixels, or remove them",
    "segments_do_not_overlap": (
        "make each pixel belong to one segment: the listed segments share pixels with another "
        "non-crowd segment of their image (re-export the panoptic PNG, or mark one iscrowd)"),
}
