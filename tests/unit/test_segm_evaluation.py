"""detr.segm_evaluation: mask AP (COCOeval segm) on hand-made masks whose scores are known."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from detr.evaluation import format_summary
from detr.segm_evaluation import (
    MASK_STAT_NAMES,
    encode_masks,
    evaluate_masks,
    mask_to_rle,
    to_segm_results,
)

H, W = 60, 80
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def rect(y0, y1, x0, x1):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def polygon(y0, y1, x0, x1):
    """A rectangle's COCO polygon whose rasterisation is rect(y0, y1, x0, x1)."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_gt(objects):
    """objects: (category, mask or polygon rectangle (y0, y1, x0, x1)) on image 1."""
    anns = []
    for n, (cat, (y0, y1, x0, x1)) in enumerate(objects, start=1):
        anns.append({"id": n, "image_id": 1, "category_id": cat, "iscrowd": 0,
                     "segmentation": polygon(y0, y1, x0, x1),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "height": H, "width": W, "file_name": "1.png"}],
                    "categories": CATEGORIES, "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_polygon_rasterises_to_the_rectangle():
    gt = make_gt([(1, (10, 20, 0, 20))])
    assert (gt.annToMask(gt.anns[1]).astype(bool) == rect(10, 20, 0, 20)).all()


def test_rle_round_trip_and_json_ready():
    mask = rect(3, 9, 5, 30)
    rle = mask_to_rle(torch.from_numpy(mask))
    assert isinstance(rle["counts"], str) and rle["size"] == [H, W]
    assert (mask_utils.decode({**rle, "counts": rle["counts"].encode()}) == mask).all()
    assert encode_masks(np.zeros((0, H, W), bool)) == []


def test_perfect_masks_score_one():
    gt = make_gt([(1, (10, 20, 0, 20)), (2, (30, 50, 40, 70))])
    masks = np.stack([rect(10, 20, 0, 20), rect(30, 50, 40, 70)])
    result = evaluate_masks(gt, {1: {"masks": masks, "scores": [0.9, 0.8], "labels": [1, 2]}})
    assert tuple(result.stats) == MASK_STAT_NAMES == result.names
    assert result.stats["mask_AP"] == pytest.approx(1.0)
    assert result.stats["mask_AR_100"] == pytest.approx(1.0)
    assert result.stats["mask_AP_large"] == -1.0  # no object over 96**2 pixels
    assert result.per_class_ap == pytest.approx({1: 1.0, 2: 1.0})
    assert result.table == format_summary(result.stats, prefix="mask_")
    assert len(result.table.splitlines()) == 12


def test_two_objects_one_at_iou_two_thirds():
    """Two cats; the second's mask is shifted by 4 of 20 columns: IoU 160 / 240 = 2/3, a
    match at IoU thresholds .50-.65 (4 of 10), a false positive from .70 on, where only the
    first cat is found: precision 1 up to recall .5, 0 after -> AP 51/101 there."""
    gt = make_gt([(1, (0, 10, 0, 20)), (1, (30, 40, 40, 60))])
    masks = [mask_to_rle(rect(0, 10, 0, 20)), mask_to_rle(rect(30, 40, 44, 64))]
    result = evaluate_masks(gt, {1: {"masks": masks, "scores": [0.9, 0.8], "labels": [1, 1]}})
    half = 51 / 101
    assert result.stats["mask_AP50"] == pytest.approx(1.0)
    assert result.stats["mask_AP75"] == pytest.approx(half)
    assert result.stats["mask_AP"] == pytest.approx((4 * 1.0 + 6 * half) / 10)
    assert result.per_class_ap[2] is None  # no dog in the ground truth


def test_empty_predictions_score_zero():
    gt = make_gt([(1, (0, 10, 0, 20))])
    result = evaluate_masks(gt, {1: {"masks": np.zeros((0, H, W), bool), "scores": [],
                                     "labels": []}})
    assert result.stats["mask_AP"] == 0.0 and result.num_detections == 0


def test_masks_at_another_size_are_refused():
    gt = make_gt([(1, (0, 10, 0, 20))])
    with pytest.raises(ValueError, match=r"image 1 .*original image size"):
        evaluate_masks(gt, {1: {"masks": np.zeros((1, H // 2, W), bool), "scores": [1.0],
                                "labels": [1]}})


def test_float_masks_are_refused():
    with pytest.raises(ValueError, match="masks of image 2: masks have dtype float32"):
        to_segm_results({2: {"masks": np.full((1, 4, 4), 0.3, np.float32), "scores": [1.0],
                             "labels": [1]}})


def test_malformed_entries_name_the_image():
    with pytest.raises(ValueError, match=r"image 7 lack \['masks'\]"):
        to_segm_results({7: {"scores": [], "labels": []}})
    with pytest.raises(ValueError, match="image 7: 1 masks, 2 scores"):
        to_segm_results({7: {"masks": np.ones((1, 4, 4), bool), "scores": [1, 1],
                             "labels": [1, 1]}})


def test_ground_truth_without_segmentation_is_named():
    gt = make_gt([(1, (0, 10, 0, 20))])
    del gt.dataset["annotations"][0]["segmentation"]
    with pytest.raises(ValueError, match=r"annotation 1 lacks \['segmentation'\]"):
        evaluate_masks(gt, {})
