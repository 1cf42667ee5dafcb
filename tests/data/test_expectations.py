"""The Great Expectations suite: a valid dataset passes; each kind of defect fails by name.

Every defect case breaks one thing in a copy of the valid dataset (conftest.py) and expects
exactly the named expectations to fail, with the offending record among the examples.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipelines.params import ValidateConfig
from pipelines.validation.dataset_tables import check_files, load_tables
from pipelines.validation.expectations import run_suites
from tests.data.conftest import load_split, save_split, write_image

CONFIG = ValidateConfig(workers=1)


def validate(root: Path, config: ValidateConfig = CONFIG) -> dict[str, Any]:
    """name -> outcome of every expectation."""
    return {o.name: o for o in run_suites(load_tables(root, workers=1), config)}


def edit(root: Path, split: str, change: Callable[[dict], None]) -> None:
    data = load_split(root, split)
    change(data)
    save_split(root, split, data)


def set_bbox(ann: dict, bbox: list[float]) -> None:
    ann["bbox"], ann["area"] = bbox, bbox[2] * bbox[3]


def image_file(root: Path, split: str, index: int) -> Path:
    return root / "images" / split / load_split(root, split)["images"][index]["file_name"]


# Each case: mutate(root), params overrides, failed expectation names, a record they name.
def _dup_image_id(root: Path) -> None:
    def change(d: dict) -> None:
        old, new = d["images"][1]["id"], d["images"][0]["id"]
        d["images"][1]["id"] = new
        for a in d["annotations"]:
            a["image_id"] = new if a["image_id"] == old else a["image_id"]

    edit(root, "train", change)


def _add_boxes(root: Path, count: int) -> None:
    def change(d: dict) -> None:
        for k in range(count):
            d["annotations"].append(
                {
                    "id": 1000 + k,
                    "image_id": 1,
                    "category_id": 1,
                    "bbox": [1, 1, 5, 5],
                    "area": 25,
                    "iscrowd": 0,
                }
            )

    edit(root, "train", change)


def _skew_classes(root: Path) -> None:
    """Train boxes: 11 of category 1 or 2, one of category 3 (annotation id 3)."""

    def change(d: dict) -> None:
        for a in d["annotations"]:
            a["category_id"] = 3 if a["id"] == 3 else 1 + a["id"] % 2

    edit(root, "train", change)


def _leak(root: Path) -> None:
    shutil.copyfile(image_file(root, "val", 0), image_file(root, "train", 2))


def _new_category(root: Path) -> None:
    for split in ("train", "val"):
        edit(
            root,
            split,
            lambda d: d["categories"].append(
                {"id": 4, "name": "hexagon", "supercategory": "shape"}
            ),
        )


def _empty_val(root: Path) -> None:
    edit(root, "val", lambda d: d.update(images=[], annotations=[]))


DEFECTS = {
    "val split empty": (_empty_val, {}, {"every_split_has_images"}, {"missing": "val"}),
    "annotation image_id missing": (
        lambda r: edit(r, "train", lambda d: d["annotations"][0].pop("image_id")),
        {},
        {"annotation_image_id_present", "annotation_image_exists"},
        {"split": "train", "id": 1},
    ),
    "file name not a string": (
        lambda r: edit(r, "train", lambda d: d["images"][0].update(file_name=5)),
        {},
        {"image_file_name_present"},
        {"split": "train", "id": 1},
    ),
    "duplicate image id": (_dup_image_id, {}, {"image_ids_unique"}, {"split": "train", "id": 1}),
    "duplicate annotation id": (
        lambda r: edit(
            r, "val", lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"])
        ),
        {},
        {"annotation_ids_unique"},
        {"split": "val", "id": 13},
    ),
    "duplicate file name": (
        lambda r: edit(r, "train", lambda d: d["images"][1].update(file_name="img_001.png")),
        {},
        {"image_file_names_unique"},
        {"split": "train", "id": 2, "file_name": "img_001.png"},
    ),
    "unknown image": (
        lambda r: edit(r, "train", lambda d: d["annotations"][0].update(image_id=999)),
        {},
        {"annotation_image_exists"},
        {"split": "train", "id": 1, "image_id": 999},
    ),
    "unknown category": (
        lambda r: edit(r, "val", lambda d: d["annotations"][0].update(category_id=99)),
        {},
        {"annotation_category_exists"},
        {"split": "val", "id": 13},
    ),
    "absolute file name": (
        lambda r: edit(
            r, "train", lambda d: d["images"][0].update(file_name=str(image_file(r, "train", 0)))
        ),
        {},
        {"image_file_name_relative"},
        {"split": "train", "id": 1},
    ),
    "file name outside the folder": (
        lambda r: edit(r, "train", lambda d: d["images"][0].update(file_name="../val/img_007.png")),
        {},
        {"image_file_name_relative"},
        {"split": "train", "id": 1, "file_name": "../val/img_007.png"},
    ),
    "missing image file": (
        lambda r: image_file(r, "val", 1).unlink(),
        {},
        {"image_file_exists"},
        {"split": "val", "id": 8, "file_name": "img_008.png"},
    ),
    "corrupt image file": (
        lambda r: image_file(r, "train", 3).write_bytes(b"\x89PNG\r\n\x1a\n not really"),
        {},
        {"image_file_decodes"},
        {"split": "train", "id": 4},
    ),
    "truncated image file": (
        lambda r: image_file(r, "train", 3).write_bytes(
            image_file(r, "train", 3).read_bytes()[:60]
        ),
        {},
        {"image_file_decodes"},
        {"split": "train", "id": 4},
    ),
    "declared width wrong": (
        lambda r: edit(r, "train", lambda d: d["images"][2].update(width=65)),
        {},
        {"image_width_matches_file"},
        {"split": "train", "id": 3},
    ),
    "declared height wrong": (
        lambda r: write_image(image_file(r, "val", 0), 7, size=(64, 40)),
        {},
        {"image_height_matches_file"},
        {"split": "val", "id": 7},
    ),
    "image width missing": (
        lambda r: edit(r, "train", lambda d: d["images"][0].pop("width")),
        {},
        {"image_width_present"},
        {"split": "train", "id": 1},
    ),
    "zero box width": (
        lambda r: edit(r, "train", lambda d: d["annotations"][4]["bbox"].__setitem__(2, 0)),
        {},
        {"box_width_positive"},
        {"split": "train", "id": 5},
    ),
    "negative box height": (
        lambda r: edit(r, "train", lambda d: set_bbox(d["annotations"][5], [4, 6, 20, -3])),
        {},
        {"box_height_positive", "annotation_area_positive"},
        {"split": "train", "id": 6},
    ),
    "box past the right edge": (
        lambda r: edit(r, "val", lambda d: set_bbox(d["annotations"][2], [50, 4, 20, 10])),
        {},
        {"box_right_inside_image"},
        {"split": "val", "id": 15, "image_id": 8},
    ),
    "box above the image": (
        lambda r: edit(r, "train", lambda d: set_bbox(d["annotations"][0], [4, -3, 20, 10])),
        {},
        {"box_top_inside_image"},
        {"split": "train", "id": 1},
    ),
    "box left of the image": (
        lambda r: edit(r, "train", lambda d: set_bbox(d["annotations"][0], [-1.5, 4, 20, 10])),
        {},
        {"box_left_inside_image"},
        {"split": "train", "id": 1},
    ),
    "bbox not 4 numbers": (
        lambda r: edit(r, "train", lambda d: d["annotations"][3].update(bbox=[1, 2, 3])),
        {},
        {"annotation_bbox_is_4_numbers"},
        {"split": "train", "id": 4},
    ),
    "zero area": (
        lambda r: edit(r, "train", lambda d: d["annotations"][1].update(area=0)),
        {},
        {"annotation_area_positive"},
        {"split": "train", "id": 2},
    ),
    "area larger than the box": (
        lambda r: edit(r, "train", lambda d: d["annotations"][1].update(area=5000)),
        {},
        {"annotation_area_within_box"},
        {"split": "train", "id": 2},
    ),
    "iscrowd 2": (
        lambda r: edit(r, "val", lambda d: d["annotations"][3].update(iscrowd=2)),
        {},
        {"annotation_iscrowd_0_or_1"},
        {"split": "val", "id": 16},
    ),
    "non-numeric annotation id": (
        lambda r: edit(r, "val", lambda d: d["annotations"][3].update(id="sixteen")),
        {},
        {"annotation_id_present"},
        {"split": "val", "image_id": 8},
    ),
    "same image in train and val": (
        _leak,
        {},
        {"image_not_in_two_splits"},
        {"split": "train", "id": 3, "file_name": "img_003.png"},
    ),
    "category without train boxes": (
        _new_category,
        {},
        {"category_has_train_boxes", "category_fraction_above_min"},
        {"split": "train", "id": 4, "name": "hexagon"},
    ),
    "categories differ between splits": (
        lambda r: edit(r, "val", lambda d: d["categories"][1].update(name="box")),
        {},
        {"categories_match_train"},
        {"split": "val", "id": 2, "name": "box"},
    ),
    "rare class": (
        _skew_classes,
        {"min_class_fraction": 0.1},
        {"category_fraction_above_min"},
        {"split": "train", "id": 3, "name": "triangle"},
    ),
    "class imbalance": (
        _skew_classes,
        {"max_class_imbalance": 5.0},
        {"category_imbalance_below_max"},
        {"split": "val", "id": 3, "name": "triangle"},
    ),
    "too many boxes in an image": (
        lambda r: _add_boxes(r, 3),
        {"max_boxes_per_image": 4},
        {"boxes_per_image_in_bounds"},
        {"split": "train", "id": 1, "file_name": "img_001.png"},
    ),
    "too few boxes in an image": (
        lambda r: edit(r, "val", lambda d: d["annotations"].__delitem__(slice(0, 2))),
        {"min_boxes_per_image": 1},
        {"boxes_per_image_in_bounds"},
        {"split": "val", "id": 7},
    ),
    "more objects than queries": (
        lambda r: _add_boxes(r, 3),
        {"num_queries": 5},
        {"boxes_per_image_below_num_queries"},
        {"split": "train", "id": 1},
    ),
}


def test_valid_dataset_passes(pristine_dataset: Path) -> None:
    outcomes = validate(pristine_dataset)
    assert [n for n, o in outcomes.items() if not o.success] == []
    assert {o.table for o in outcomes.values()} == {"images", "annotations", "categories"}
    assert outcomes["image_file_decodes"].element_count == 9
    assert outcomes["box_right_inside_image"].element_count == 18


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_defect_fails_by_name(dataset: Path, defect: str) -> None:
    mutate, overrides, expected, record = DEFECTS[defect]
    mutate(dataset)
    outcomes = validate(dataset, replace(CONFIG, **overrides))
    assert {n for n, o in outcomes.items() if not o.success} == expected
    for name in expected:
        outcome = outcomes[name]
        assert outcome.error is None
        assert any(record.items() <= e.items() for e in outcome.examples), outcome.examples
        assert outcome.fix, name  # every failure says how to make it pass


def test_box_within_tolerance_passes(dataset: Path) -> None:
    edit(dataset, "train", lambda d: set_bbox(d["annotations"][0], [-0.5, 4, 60.4, 10]))
    assert all(o.success for o in validate(dataset).values())
    failed = validate(dataset, replace(CONFIG, box_tolerance_px=0.25))
    assert {n for n, o in failed.items() if not o.success} == {"box_left_inside_image"}


def test_examples_are_capped(dataset: Path) -> None:
    outcomes = validate(dataset, replace(CONFIG, num_queries=2, max_examples=4))
    failed = outcomes["boxes_per_image_below_num_queries"]
    assert (failed.unexpected_count, len(failed.examples)) == (9, 4)


def test_file_checks_in_worker_processes_match_in_process(pristine_dataset: Path) -> None:
    files = sorted(str(p) for p in (pristine_dataset / "images").rglob("*.png"))
    paths = (files + [str(pristine_dataset / "nope.png"), None]) * 30  # enough to use workers
    assert check_files(paths, workers=2) == check_files(paths, workers=1)
    exists, decodes, width, height, sha1 = check_files(files[:1], workers=1)[0]
    assert (exists, decodes, width, height, len(sha1)) == (True, True, 64, 48, 40)


def test_empty_dataset_fails_on_splits_and_categories(tmp_path: Path) -> None:
    for split in ("train", "val"):
        save_split(tmp_path, split, {"images": [], "annotations": [], "categories": []})
    outcomes = validate(tmp_path)
    failed = {n for n, o in outcomes.items() if not o.success}
    assert failed == {"every_split_has_images", "categories_not_empty"}
    assert outcomes["categories_not_empty"].observed == 0
    assert {e["missing"] for e in outcomes["every_split_has_images"].examples} == {"train", "val"}
