"""The mask checks: a clean masked dataset (polygons; panoptic RLEs) passes, each defect is
caught by its expectation's name with the record named, a box-only dataset gets no mask checks."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detr.data.detect_layout import detect_layout, import_layout
from detr.data.masks import mask_to_rle, segmentation_area
from pipelines.validation.dataset_tables import load_tables
from pipelines.validation.mask_tables import mask_frame
from tests.data.conftest import HEIGHT, WIDTH, write_coco_dataset
from tests.data.test_expectations import edit, validate
from tests.unit.test_masks import SEGMENTATIONS
from tests.unit.test_panoptic_import import write_panoptic_release

MASK_CHECKS = {"annotation_has_segmentation", "segmentation_polygon_well_formed",
               "segmentation_polygon_inside_image", "segmentation_rle_decodes",
               "segmentation_rle_size_matches_image", "mask_not_empty", "mask_area_matches_area",
               "mask_box_matches_bbox", "segments_do_not_overlap"}


def _rectangle(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _rle(x: int, y: int, w: int, h: int, size=(HEIGHT, WIDTH)) -> dict:
    mask = np.zeros(size, np.uint8)
    mask[y:y + h, x:x + w] = 1
    return mask_to_rle(mask)


def _with_polygons(data: dict) -> None:
    for ann in data["annotations"]:
        # whole pixels: pycocotools rasterises a 25.5 px wide polygon 26 px wide, which the
        # box check annotation_area_within_box (area <= w * h) would catch
        ann["bbox"] = [float(int(v)) for v in ann["bbox"]]
        ann["segmentation"] = _rectangle(*ann["bbox"])
        ann["area"] = segmentation_area(ann["segmentation"], HEIGHT, WIDTH)


def _panoptic(data: dict) -> None:
    """Integer boxes, RLE masks, a stuff category: as the panoptic importer writes them."""
    for ann in data["annotations"]:
        ann["bbox"] = [int(v) for v in ann["bbox"]]
        ann["segmentation"] = _rle(*ann["bbox"])
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    for category in data["categories"]:
        category["isthing"] = int(category["id"] != 3)


def _dataset(root: Path, change: Callable[[dict], None]) -> Path:
    write_coco_dataset(root)
    for split in ("train", "val"):
        edit(root, split, change)
    return root


@pytest.fixture
def masked(tmp_path: Path) -> Path:
    return _dataset(tmp_path / "masked", _with_polygons)


@pytest.fixture
def panoptic(tmp_path: Path) -> Path:
    return _dataset(tmp_path / "panoptic", _panoptic)


def _first(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Apply ``change`` to the first train annotation (id 1, image 1)."""
    return lambda root: edit(root, "train", lambda d: change(d["annotations"][0]))


def _polygon_past_the_edge(ann: dict) -> None:
    ann["segmentation"] = _rectangle(40, 6, 26, 16)  # 2 px right of the 64 px wide image
    ann["bbox"], ann["area"] = [40, 6, 24, 16], 24 * 16


def _overlap(data: dict) -> None:
    data["annotations"][1]["segmentation"] = _rle(10, 10, 40, 30)  # over annotation 1's
    data["annotations"][1]["bbox"], data["annotations"][1]["area"] = [10, 10, 40, 30], 1200


# name -> (dataset fixture, mutate, failed expectations, a record they name)
DEFECTS = {
    "annotation without segmentation": ("masked", _first(lambda a: a.pop("segmentation")),
                                        {"annotation_has_segmentation"}, {"id": 1}),
    "polygon of two points": ("masked", _first(lambda a: a.update(segmentation=[[1, 1, 5, 1]])),
                              {"segmentation_polygon_well_formed"}, {"id": 1}),
    "odd coordinate count": ("masked", _first(lambda a: a["segmentation"][0].append(3)),
                             {"segmentation_polygon_well_formed"}, {"id": 1}),
    "polygon past the edge": ("masked", _first(_polygon_past_the_edge),
                              {"segmentation_polygon_inside_image"}, {"id": 1}),
    "rle counts do not decode": (
        "panoptic", _first(lambda a: a["segmentation"].update(counts="zz")),
        {"segmentation_rle_decodes"}, {"id": 1}),
    "rle of another size": (
        "panoptic", _first(lambda a: a.update(segmentation=_rle(4, 6, 20, 16, (49, 64)))),
        {"segmentation_rle_size_matches_image"}, {"id": 1}),
    "empty mask": ("panoptic", _first(lambda a: a.update(segmentation=_rle(0, 0, 0, 0))),
                   {"mask_not_empty", "mask_area_matches_area"}, {"id": 1}),
    "area off": ("masked", _first(lambda a: a.update(area=a["area"] * 0.7)),
                 {"mask_area_matches_area"}, {"id": 1}),
    "bbox off the mask": ("masked", _first(lambda a: a.update(bbox=[9, 6, 20, 16])),
                          {"mask_box_matches_bbox"}, {"id": 1}),
    "segments overlap": ("panoptic", lambda r: edit(r, "train", _overlap),
                         {"segments_do_not_overlap"}, {"id": 2}),
}


@pytest.mark.parametrize("fixture", ["masked", "panoptic"])
def test_clean_masked_dataset_passes(fixture: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(fixture)
    outcomes = validate(root)
    assert [n for n, o in outcomes.items() if not o.success] == []
    assert MASK_CHECKS <= set(outcomes)
    assert outcomes["mask_area_matches_area"].element_count == 18
    overlap = load_tables(root, workers=1).masks["overlap_px"]
    assert overlap.notna().all() if fixture == "panoptic" else overlap.isna().all()


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_mask_defect_fails_by_name(defect: str, request: pytest.FixtureRequest) -> None:
    fixture, mutate, expected, record = DEFECTS[defect]
    root = request.getfixturevalue(fixture)
    mutate(root)
    outcomes = validate(root)
    assert {n for n, o in outcomes.items() if not o.success} == expected
    for name in expected:
        outcome = outcomes[name]
        assert outcome.table == "masks" and outcome.error is None
        wanted = {"split": "train", "image_id": 1, "file_name": "img_001.png", **record}
        assert any(wanted.items() <= e.items() for e in outcome.examples), outcome.examples
        assert outcome.fix, name


def test_fixes_name_the_params_key_and_a_passing_value(masked: Path) -> None:
    _first(lambda a: a.update(area=a["area"] * 0.7))(masked)
    _first(lambda a: a.update(bbox=[9, 6, 20, 16]))(masked)
    outcomes = validate(masked)
    assert "validate.mask_area_tolerance >= 0.288" in outcomes["mask_area_matches_area"].fix
    assert "validate.mask_box_tolerance_px >= 3" in outcomes["mask_box_matches_bbox"].fix


def test_box_only_dataset_gets_no_mask_checks(pristine_dataset: Path, masked: Path) -> None:
    start = time.perf_counter()
    tables = load_tables(pristine_dataset, workers=1)
    box_only = time.perf_counter() - start
    assert tables.masks is None
    outcomes = validate(pristine_dataset)
    assert not MASK_CHECKS & set(outcomes)
    assert {o.table for o in outcomes.values()} == {"images", "annotations", "categories"}
    start = time.perf_counter()
    assert load_tables(masked, workers=1).masks is not None
    assert time.perf_counter() - start < box_only * 3 + 1.0  # the masks' measures are cheap
    assert load_tables(masked, workers=1, masks=False).masks is None  # task: detection


@settings(max_examples=200, derandomize=True, deadline=None)
@given(segm=SEGMENTATIONS, area=st.one_of(st.none(), st.floats(), st.integers(-5, 900)),
       size=st.sampled_from([(HEIGHT, WIDTH), (None, WIDTH), (0, 5)]))
def test_mask_table_measures_any_segmentation(segm, area, size) -> None:
    """Whatever the segmentation, area or image size, the table is built (no crash)."""
    anns = [{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4], "area": area, "segmentation": segm},
            {"id": 2, "image_id": 1, "bbox": [0, 0, 9, 9], "segmentation": _rle(0, 0, 9, 9)}]
    raw = {"train": {"annotations": anns, "categories": [{"id": 1, "isthing": 0}]},
           "val": {"annotations": [], "categories": []}}
    images = pd.DataFrame({"split": ["train"], "id": [1], "file_name": ["a.png"],
                           "height": [size[0]], "width": [size[1]]})
    frame = mask_frame(raw, images)
    assert frame is not None and list(frame["id"])[-1] == 2


def test_imported_panoptic_release_passes(tmp_path: Path) -> None:
    root = write_panoptic_release(tmp_path / "src")
    import_layout(detect_layout(root), tmp_path / "out")
    outcomes = validate(tmp_path / "out")
    assert [n for n, o in outcomes.items() if not o.success] == []
    assert outcomes["segments_do_not_overlap"].element_count == 15


def test_instances_of_things_may_overlap(masked: Path) -> None:
    def things_overlap(data: dict) -> None:
        _overlap(data)
        for category in data["categories"]:
            category["isthing"] = 1

    edit(masked, "train", things_overlap)
    edit(masked, "val", lambda d: [c.update(isthing=1) for c in d["categories"]])
    outcomes = validate(masked)
    assert [n for n, o in outcomes.items() if not o.success] == []
    assert load_tables(masked, workers=1).masks["overlap_px"].isna().all()
