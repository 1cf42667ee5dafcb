"""Each failed expectation says how to pass: the params key and a value computed from the data
(checked by re-validating with it), or, for a data defect, what to fix in the listed records."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from tests.data.test_expectations import CONFIG, DEFECTS, validate

# defect (from DEFECTS) or params overrides on the valid data -> {expectation: its fix}: the
# params key and a value computed from the data, or (a data defect) what to fix.
FIXES = {
    "more objects than queries": {"boxes_per_image_below_num_queries": (
        "set model.num_queries >= 6 (the most boxes in one image is 5; validate.num_queries, "
        "if set, too)")},
    "too many boxes in an image": {"boxes_per_image_in_bounds": (
        "set validate.max_boxes_per_image >= 5 (the most boxes in one image is 5)")},
    "too few boxes in an image": {"boxes_per_image_in_bounds": (
        "set validate.min_boxes_per_image <= 0 (the fewest boxes in one image is 0)")},
    "rare class": {"category_fraction_above_min": "validate.min_class_fraction <= 0.0833 "},
    "class imbalance": {"category_imbalance_below_max": "validate.max_class_imbalance >= 6 "},
    "category without train boxes": {
        "category_has_train_boxes": "set validate.min_train_boxes_per_class <= 0 ",
        "category_fraction_above_min": "set validate.min_class_fraction <= 0 "},
    "box past the right edge": {"box_right_inside_image": (
        "fix the listed boxes (up to 6 px right of the image), or set "
        "validate.box_tolerance_px >= 6")},
    "box left of the image": {"box_left_inside_image": "validate.box_tolerance_px >= 1.5"},
    "area larger than the box": {"annotation_area_within_box": "area_tolerance >= 7.913 "},
    "zero box width": {"box_width_positive": "fix the data: the listed boxes need a width > 0"},
    "missing image file": {"image_file_exists": "fix the data: add the listed image files"},
    "annotation image_id missing": {
        "annotation_image_id_present": "fix the data: give the listed records a valid 'image_id'",
        "annotation_image_exists": "fix the data: point the listed annotations' image_id"},
    "val split empty": {"every_split_has_images": "prepare.val_fraction > 0"},
    "min_box_side_px": {
        "box_width_positive": "set validate.min_box_side_px < 16 (the smallest box side is 16 px",
        "box_height_positive": "set validate.min_box_side_px < 16 "},
}


@pytest.mark.parametrize("case", list(FIXES))
def test_each_failure_names_the_params_key_and_a_value_that_passes(dataset: Path,
                                                                    case: str) -> None:
    if case in DEFECTS:
        mutate, overrides, _, _ = DEFECTS[case]
        mutate(dataset)
    else:
        overrides = {case: 21.0}
    config = replace(CONFIG, **overrides)
    outcomes = validate(dataset, config)
    for name, text in FIXES[case].items():
        assert text in outcomes[name].fix, outcomes[name].fix
    for name in FIXES[case]:  # the value named passes (a strict bound: just below it)
        match = re.search(r"set validate\.(\w+) ([<>]=?) ([\d.]+)", outcomes[name].fix)
        if match:
            key, op, value = match.groups()
            number = float(value) - (0.001 if op == "<" else 0)
            fixed = replace(config, **{key: type(getattr(config, key))(number)})
            assert validate(dataset, fixed)[name].success, (name, key, number)


def test_an_infinite_value_asks_to_fix_the_data(dataset: Path) -> None:
    path = dataset / "annotations" / "train.json"
    path.write_text(path.read_text().replace('"area": 561.0', '"area": Infinity', 1))
    failed = validate(dataset)["annotation_area_within_box"]
    assert failed.fix == ("fix the data: the listed records hold values no bound passes "
                          "(NaN, inf)")
