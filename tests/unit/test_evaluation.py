"""detr.evaluation on hand-made ground truth and detections whose COCO scores are known exactly."""

import builtins
import contextlib
import io
import json
import re
import sys

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from detr.evaluation import (
    STAT_NAMES,
    evaluate_detections,
    format_per_class,
    format_summary,
    to_coco_results,
)

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
# (image_id, category_id, [x, y, w, h]): a small cat (area 400), a medium dog (3600) and a
# medium cat (2000); no large object and no bird, so *_large is -1 and bird has no AP.
OBJECTS = [(1, 1, [10, 10, 20, 20]), (2, 2, [50, 50, 60, 60]), (3, 1, [20, 30, 40, 50])]
TOL = 1e-9  # pycocotools divides by tp + fp + eps: values are exact up to ~1e-16
LINE = re.compile(
    r"^ Average (Precision|Recall)  *\((AP|AR)\) @\[ IoU=(0\.50:0\.95|0\.50|0\.75) *"
    r"\| area=( {3}all| small|medium| large) \| maxDets=( {2}1| 10|100) \] = -?\d\.\d{3}$"
)


def gt_dataset(objects, num_images=3):
    """A COCO annotation dict, each annotation's ``area`` set to w * h."""
    return {
        "images": [
            {"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"}
            for i in range(1, num_images + 1)
        ],
        "categories": CATEGORIES,
        "annotations": [
            {
                "id": n,
                "image_id": img,
                "category_id": cat,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            for n, (img, cat, box) in enumerate(objects, start=1)
        ],
    }


def make_gt(objects=OBJECTS, num_images=3):
    coco = COCO()
    coco.dataset = gt_dataset(objects, num_images)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections(rows):
    """(image_id, category_id, [x, y, w, h], score) rows -> detector output (xyxy tensors)."""
    out = {}
    for img, cat, (x, y, w, h), score in rows:
        entry = out.setdefault(img, {"boxes": [], "scores": [], "labels": []})
        entry["boxes"].append([x, y, x + w, y + h])
        entry["scores"].append(score)
        entry["labels"].append(cat)
    return {
        img: {
            "boxes": torch.tensor(e["boxes"], dtype=torch.float32),
            "scores": torch.tensor(e["scores"]),
            "labels": torch.tensor(e["labels"]),
        }
        for img, e in out.items()
    }


def perfect(objects=OBJECTS):
    return detections([(img, cat, box, 0.9) for img, cat, box in objects])


def expected(values, undefined=("AP_small", "AP_large", "AR_small", "AR_large")):
    """All 12 statistics: ``values`` by name, -1 for ``undefined``."""
    return {name: -1.0 if name in undefined else values[name] for name in STAT_NAMES}


def assert_stats(stats, want):
    assert list(stats) == list(STAT_NAMES)
    for name in STAT_NAMES:
        assert stats[name] == pytest.approx(want[name], abs=TOL), name


def test_to_coco_results_converts_xyxy_tensors_and_arrays_to_xywh():
    preds = {
        5: {
            "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]),
            "scores": torch.tensor([0.5]),
            "labels": torch.tensor([3]),
        },
        6: {"boxes": np.array([[1.0, 2.0, 4.0, 8.0]]), "scores": [0.25], "labels": [7]},
        7: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)},
    }
    assert to_coco_results(preds) == [
        {"image_id": 5, "category_id": 3, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5},
        {"image_id": 6, "category_id": 7, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.25},
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"boxes": torch.zeros(2, 3), "scores": torch.zeros(2), "labels": torch.ones(2)},
            r"boxes of image 7 have shape",
        ),
        (
            {"boxes": torch.zeros(2, 4), "scores": torch.zeros(1), "labels": torch.ones(2)},
            r"image 7: 2 boxes, 1 scores, 2 labels",
        ),
        (
            {
                "boxes": torch.tensor([[5.0, 5.0, 1.0, 9.0]]),
                "scores": torch.ones(1),
                "labels": torch.ones(1),
            },
            r"boxes of image 7 are not x1 <= x2",
        ),
        ({"boxes": torch.zeros(1, 4), "labels": torch.ones(1)}, r"image 7 lack \['scores'\]"),
    ],
)
def test_to_coco_results_names_the_bad_image(entry, message):
    with pytest.raises(ValueError, match=message):
        to_coco_results({7: entry})


def test_perfect_detections_score_one_and_minus_one_where_no_large_objects():
    result = evaluate_detections(make_gt(), perfect())
    assert_stats(
        result.stats, expected(dict.fromkeys(STAT_NAMES, 1.0), undefined=("AP_large", "AR_large"))
    )
    assert result.per_class_ap == pytest.approx({1: 1.0, 2: 1.0, 3: None}, abs=TOL)
    assert result.num_images == 3 and result.num_detections == 3
    assert result.pr_curve.precision_50 == pytest.approx([1.0] * 101, abs=TOL)


@pytest.mark.parametrize(("shift", "passed"), [(6, 7), (18, 1)])
def test_shift_to_a_known_iou_passes_a_known_number_of_thresholds(shift, passed):
    # GT 60x60 at x=50, detection shifted right: IoU = (60 - shift) / (60 + shift).
    # shift 6: 54/66 = 0.818 passes .50 ... .80 (7 of 10); shift 18: 42/78 = 0.538 passes
    # only .50. One GT, one detection: precision 1 at every recall where it matches, else 0.
    gt = make_gt([(1, 2, [50, 50, 60, 60])], num_images=1)
    result = evaluate_detections(gt, detections([(1, 2, [50 + shift, 50, 60, 60], 0.8)]))
    ap = passed / 10
    want = {
        "AP": ap,
        "AP50": 1.0,
        "AP75": float(passed >= 6),
        "AP_medium": ap,
        "AR_1": ap,
        "AR_10": ap,
        "AR_100": ap,
        "AR_medium": ap,
    }
    assert_stats(result.stats, expected(want))
    assert result.per_class_ap == pytest.approx({1: None, 2: ap, 3: None}, abs=TOL)
    curve = result.pr_curves[2]
    assert curve.recall == pytest.approx([i / 100 for i in range(101)], abs=1e-12)
    assert curve.precision_50 == pytest.approx([1.0] * 101, abs=TOL)
    assert curve.precision_50_95 == pytest.approx([ap] * 101, abs=TOL)


def test_101_point_interpolation_of_tp_fp_tp():
    # Two dogs, detections by score: hit, miss (far away, same size), hit.
    # Raw (recall, precision): (.5, 1), (.5, 1/2), (1, 2/3); made monotone: 1, 2/3, 2/3.
    # Recall thresholds 0.00..0.50 (51 of them) read 1, 0.51..1.00 (50) read 2/3:
    # AP = (51 + 50 * 2/3) / 101 = 253/303 at every IoU threshold (the hits are exact).
    dogs = [(1, 2, [10, 10, 40, 40]), (1, 2, [100, 100, 40, 40])]
    rows = [
        (1, 2, [10, 10, 40, 40], 0.9),
        (1, 2, [150, 10, 40, 40], 0.8),
        (1, 2, [100, 100, 40, 40], 0.7),
    ]
    result = evaluate_detections(make_gt(dogs, num_images=1), detections(rows))
    ap = 253 / 303
    want = {
        "AP": ap,
        "AP50": ap,
        "AP75": ap,
        "AP_medium": ap,
        "AR_1": 0.5,
        "AR_10": 1.0,
        "AR_100": 1.0,
        "AR_medium": 1.0,
    }
    assert_stats(result.stats, expected(want))
    assert result.pr_curve.precision_50 == pytest.approx([1.0] * 51 + [2 / 3] * 50, abs=TOL)
    assert result.pr_curve.precision_50_95 == result.pr_curves[2].precision_50_95


@pytest.mark.parametrize(
    "preds",
    [
        {},
        {
            1: {
                "boxes": torch.zeros(0, 4),
                "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64),
            }
        },
    ],
    ids=["no-images", "image-with-no-boxes"],
)
def test_empty_predictions_give_zeros_and_a_full_table(preds):
    result = evaluate_detections(make_gt(), preds)
    assert_stats(
        result.stats, expected(dict.fromkeys(STAT_NAMES, 0.0), undefined=("AP_large", "AR_large"))
    )
    assert result.per_class_ap == {1: 0.0, 2: 0.0, 3: None}
    assert result.num_detections == 0
    lines = result.table.splitlines()
    assert len(lines) == 12 and all(LINE.match(line) for line in lines)
    assert lines[0].endswith("= 0.000") and lines[5].endswith("= -1.000")
    assert result.pr_curve.precision_50_95 == (0.0,) * 101


def test_one_class_perfect_one_missed():
    cats_only = [(img, cat, box, 0.9) for img, cat, box in OBJECTS if cat == 1]
    result = evaluate_detections(make_gt(), detections(cats_only))
    assert result.per_class_ap == pytest.approx({1: 1.0, 2: 0.0, 3: None}, abs=TOL)
    assert result.stats["AP"] == pytest.approx(0.5, abs=TOL)
    assert sorted(result.pr_curves) == [1, 2]
    assert result.pr_curves[2].precision_50 == (0.0,) * 101
    table = format_per_class(result).splitlines()
    assert table[1:] == ["     1  cat   1.000", "     2  dog   0.000", "     3  bird  no gt"]


def test_class_absent_from_val_is_reported_and_costs_nothing():
    birds = [(1, 3, [100, 100, 50, 50], 0.99), (2, 3, [0, 0, 30, 30], 0.95)]
    rows = [(img, cat, box, 0.9) for img, cat, box in OBJECTS] + birds
    result = evaluate_detections(make_gt(), detections(rows))
    assert result.stats == evaluate_detections(make_gt(), perfect()).stats
    assert result.per_class_ap[3] is None and 3 not in result.pr_curves
    assert result.category_names == {1: "cat", 2: "dog", 3: "bird"}


def test_table_is_pycocotools_summary_and_format_summary_rebuilds_it():
    result = evaluate_detections(make_gt(), perfect())
    lines = result.table.splitlines()
    assert len(lines) == 12 and all(LINE.match(line) for line in lines)
    assert lines[0] == (
        " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000"
    )
    assert lines[11] == (
        " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = -1.000"
    )
    assert format_summary(result.stats) == result.table
    with pytest.raises(KeyError, match="AR_large"):
        format_summary({k: v for k, v in result.stats.items() if k != "AR_large"})


def test_json_path_ground_truth_is_quiet(tmp_path, capsys):
    path = tmp_path / "val.json"
    path.write_text(json.dumps(gt_dataset(OBJECTS)))
    result = evaluate_detections(path, perfect())
    assert result.stats["AP"] == pytest.approx(1.0, abs=TOL)
    assert capsys.readouterr().out == ""


def test_image_ids_restrict_the_evaluation():
    result = evaluate_detections(make_gt(), perfect(), image_ids=[2])
    assert result.num_images == 1
    assert result.per_class_ap == pytest.approx({1: None, 2: 1.0, 3: None}, abs=TOL)


def test_bad_inputs_name_the_culprit():
    with pytest.raises(ValueError, match=r"not in the ground truth: \[99\]"):
        evaluate_detections(make_gt(), detections([(99, 1, [0, 0, 5, 5], 0.5)]))
    no_area = make_gt()
    del no_area.dataset["annotations"][1]["area"]
    with pytest.raises(ValueError, match=r"annotation 2 lacks \['area'\]"):
        evaluate_detections(no_area, perfect())


def test_table_is_captured_when_a_framework_reroutes_print(monkeypatch):
    """Prefect's ``log_prints`` replaces ``print``: stdout prints go to a run logger, prints to
    an explicit file pass through. The table must not end up in the log (it was empty, and the
    evaluate stage failed whenever it ran as a Prefect flow)."""
    logged, real = [], builtins.print

    def log_prints(*args, **kwargs):
        if kwargs.get("file") not in (None, sys.stdout, sys.stderr):
            return real(*args, **kwargs)
        logged.append(" ".join(map(str, args)))

    monkeypatch.setattr(builtins, "print", log_prints)
    result = evaluate_detections(make_gt(), perfect())
    assert len(result.table.splitlines()) == 12 and LINE.match(result.table.splitlines()[0])
    assert not any("Average Precision" in line for line in logged)
