"""detr.diagnosis and detr.duplicates on hand-made detections and curves with known answers, and
on a tiny trained model that cannot see its objects."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from pycocotools.coco import COCO

from detr import diagnosis as dg
from detr.duplicates import class_wise_nms, count_duplicates
from detr.evaluation import evaluate_detections

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def make_gt(objects, size=200):
    """``objects``: (image_id, category_id, [x, y, w, h]) on ``size`` px square images."""
    coco = COCO()
    images = sorted({img for img, _, _ in objects})
    coco.dataset = {
        "images": [{"id": i, "width": size, "height": size, "file_name": f"{i}.png"}
                   for i in images],
        "categories": CATEGORIES,
        "annotations": [{"id": n, "image_id": img, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0}
                        for n, (img, cat, box) in enumerate(objects, start=1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def dets(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels)}


def xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


# ---- duplicates -------------------------------------------------------------------------------

def test_duplicates_count_second_boxes_of_the_same_class_only():
    box = [10.0, 10.0, 60.0, 60.0]
    near = [12.0, 12.0, 61.0, 61.0]  # IoU ~0.92 with box
    far = [100.0, 100.0, 150.0, 150.0]
    predictions = {
        1: dets([box, near, near, far], [0.9, 0.8, 0.7, 0.6], [1, 1, 2, 1]),  # one duplicate
        2: dets([box, near, box], [0.95, 0.4, 0.35], [1, 1, 1]),  # two, under 0.5 both
    }
    at_half = count_duplicates(predictions, score_threshold=0.5)
    assert (at_half.boxes, at_half.duplicates) == (5, 1)
    assert at_half.fraction == pytest.approx(0.2)
    at_low = count_duplicates(predictions, score_threshold=0.3)
    assert (at_low.boxes, at_low.duplicates) == (7, 3)


def test_duplicates_ignore_overlaps_at_or_below_the_iou_threshold():
    a, b = [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.0]  # IoU exactly 0.6
    found = count_duplicates({1: dets([a, b], [0.9, 0.8], [1, 1])}, score_threshold=0.5)
    assert found.duplicates == 0 and found.boxes == 2
    assert count_duplicates({}, score_threshold=0.5).fraction == 0.0


def test_class_wise_nms_drops_the_lower_duplicate():
    box, near = [10.0, 10.0, 60.0, 60.0], [12.0, 12.0, 61.0, 61.0]
    kept = class_wise_nms(dets([near, box, near], [0.8, 0.9, 0.7], [1, 1, 2]), 0.6)
    assert kept["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert kept["labels"].tolist() == [1, 2]


def test_duplicate_finding_names_the_fraction_and_the_nms_ap():
    gt = make_gt([(1, 1, [10, 10, 50, 50])])
    predictions = {1: dets([xyxy([10, 10, 50, 50]), xyxy([11, 11, 50, 50])], [0.9, 0.8],
                           [1, 1])}
    finding = dg.duplicate_finding(gt, predictions, score_threshold=0.5, ap=0.5)
    assert finding.weak and "50%" in finding.verdict
    assert finding.values["duplicates_0.5"] == 0.5 and finding.values["duplicates_0.3"] == 0.5
    assert finding.values["AP_class_wise_nms"] == pytest.approx(1.0)
    assert finding.turns == (("evaluate.nms", "0.6"),)  # it raises AP: the knob to turn


def test_with_evaluate_nms_the_finding_counts_what_the_model_draws_and_is_not_a_weakness():
    gt = make_gt([(1, 1, [10, 10, 50, 50])])
    raw = {1: dets([xyxy([10, 10, 50, 50]), xyxy([11, 11, 50, 50])], [0.9, 0.8], [1, 1])}
    kept = {1: class_wise_nms(raw[1], 0.6)}
    finding = dg.duplicate_finding(gt, kept, score_threshold=0.5, ap=1.0, nms=0.6, raw=raw)
    assert not finding.weak and finding.values["duplicates_0.5"] == 0.5
    assert "evaluate.nms 0.6 removes them" in finding.summary
    # ranked below its object's box, the duplicate costs this AP nothing: measured, not assumed
    assert finding.values["AP_without_nms"] == pytest.approx(1.0)


# ---- class-agnostic AP and recall at IoU 0.1 -------------------------------------------------

def test_class_agnostic_ap_is_at_least_the_per_class_ap_and_names_the_class_knob():
    objects = [(1, 1, [10, 10, 50, 50]), (2, 2, [20, 20, 60, 60]), (3, 1, [30, 30, 40, 40])]
    gt = make_gt(objects)
    # Every box exactly right, the class of two of them wrong.
    predictions = {img: dets([xyxy(box)], [0.9], [3 - cat if img < 3 else cat])
                   for img, cat, box in objects}
    ap = evaluate_detections(gt, predictions).stats["AP"]
    agnostic = dg.class_agnostic_ap(gt, predictions)
    assert agnostic == pytest.approx(1.0) and ap < 0.5
    finding = dg.classification_finding(ap, agnostic, num_classes=2, ce_loss_coef=5.0)
    assert finding.verdict.endswith("turn: loss.ce_loss_coef to 10")
    right = dg.classification_finding(0.9, 0.95, num_classes=2, ce_loss_coef=5.0)
    assert not right.weak and right.verdict is None


def test_recall_at_iou_01_finds_rough_boxes_that_iou_05_misses():
    gt = make_gt([(1, 1, [0, 0, 100, 100]), (1, 1, [150, 150, 40, 40])])
    # A quarter of the first box (IoU 0.25); nothing near the second.
    predictions = {1: dets([[0.0, 0.0, 50.0, 50.0]], [0.9], [1])}
    assert dg.recall_iou10(gt, predictions) == pytest.approx(0.5)
    assert evaluate_detections(gt, predictions).stats["AR_100"] == 0.0
    wrong_class = {1: dets([[0.0, 0.0, 50.0, 50.0]], [0.9], [2])}
    assert dg.recall_iou10(gt, wrong_class) == 0.0
    assert dg.recall_iou10(gt, wrong_class, use_cats=False) == pytest.approx(0.5)
    finding = dg.recall_finding(0.2, 0.3, fallback=(("train.epochs", "24"),))
    assert finding.verdict == ("found: 80% of the val objects get no box of their class even "
                               "at IoU 0.1: they are not found at all; turn: train.epochs to 24")


# ---- object size against the stride ----------------------------------------------------------

def test_objects_under_one_cell_name_data_scales_and_an_earlier_stage():
    # 400 px images shown at 128 px (factor 0.32): 41-60 px objects become 13-19 px, under one
    # cell of 32 px; stride 8 (layer2) would show them 1.6-2.4 cells wide.
    gt = make_gt([(i, 1, [10, 10, 40 + i, 40 + i]) for i in range(1, 21)], size=400)
    sqrt_area, short = dg.object_cells(gt, scales=(112, 128), max_size=200, stride=32)
    assert sqrt_area.max() == pytest.approx(60 * 128 / 400 / 32)
    finding = dg.size_finding(sqrt_area, short, scales=(112, 128), max_size=200, stride=32,
                              last_stage="layer4")
    assert finding.weak and finding.values["under_one_cell"] == 1.0
    assert "turn: data.scales to [" in finding.verdict
    assert "or model.last_stage to layer2" in finding.verdict
    suggested = eval(finding.turns[0][1].split(" and")[0])  # noqa: S307 (our own list text)
    smallest = dg.object_cells(gt, scales=suggested, max_size=10_000, stride=32)[0]
    assert (smallest >= 1).mean() >= 0.95  # the suggestion makes them visible


def test_objects_far_too_small_get_the_earliest_stage_with_larger_scales():
    # 7-16 px boxes on 320 px tiles at 128 px: 0.09-0.2 cells of 32 px; layer2 alone (x4)
    # does not reach one cell.
    gt = make_gt([(i, 1, [0, 0, 6 + i, 6 + i]) for i in range(1, 11)], size=320)
    cells = dg.object_cells(gt, scales=(112, 128), max_size=200, stride=32)
    finding = dg.size_finding(*cells, scales=(112, 128), max_size=200, stride=32,
                              last_stage="layer4")
    assert finding.weak and finding.turns[1][0] == "model.last_stage"
    assert finding.turns[1][1].startswith("layer2 and data.scales to [")
    dc5 = dg.size_finding(*cells, scales=(112, 128), max_size=200, stride=16,
                          last_stage="layer4")
    assert dc5.turns[1][1].startswith("layer2 and")  # layer3 is no finer than DC5's layer4
    assert len(dg.size_finding(*cells, scales=(112, 128), max_size=200, stride=8,
                               last_stage="layer2").turns) == 1  # no earlier stage


@pytest.mark.parametrize("last_stage", ["layer2", "layer3", "layer4"])
def test_output_stride_is_what_the_backbone_measures(last_stage):
    from detr.models.backbone import Backbone, output_stride

    built = Backbone("resnet18", norm="bn", last_stage=last_stage).stride
    assert output_stride(last_stage) == built == {"layer2": 8, "layer3": 16, "layer4": 32}[
        last_stage]
    assert output_stride("layer4", dilation=True) == 16


def test_objects_several_cells_wide_are_no_finding():
    gt = make_gt([(1, 1, [10, 10, 100, 100])], size=200)
    cells = dg.object_cells(gt, scales=(200,), max_size=333, stride=8)
    finding = dg.size_finding(*cells, scales=(200,), max_size=333, stride=8, last_stage="layer2")
    assert not finding.weak and finding.values["median_cells"] == pytest.approx(12.5)


# ---- curves and decoder layers ---------------------------------------------------------------

def test_loss_still_falling_says_train_longer():
    falling = [3.0, 2.5, 2.1, 1.8, 1.6, 1.4, 1.25, 1.1]
    flat = [3.0, 2.0, 1.5, 1.2, 1.01, 1.0, 1.0, 0.99]
    finding = dg.loss_finding(falling, length=("train.epochs", "24"))
    assert finding.weak and finding.verdict.endswith("turn: train.epochs to 24")
    assert dg.relative_drop(falling) == pytest.approx((1.4 - 1.1) / 1.4, rel=0.05)
    assert not dg.loss_finding(flat, length=("train.epochs", "24")).weak
    assert not dg.loss_finding([2.0, 1.0], length=("train.epochs", "24")).weak
    assert dg.training_length({"epochs": 12}) == ("train.epochs", "24")
    assert dg.training_length({"epochs": 12, "steps": 3000}) == ("train.steps", "6000")


def test_val_curve_best_at_the_end_and_still_rising():
    rising = dg.val_curve_finding([(500, 0.1), (1000, 0.2), (1500, 0.3)],
                                  length=("train.epochs", "24"))
    assert rising.weak and rising.values["val_AP_best_step"] == 1500
    peaked = dg.val_curve_finding([(500, 0.1), (1000, 0.3), (1500, 0.25)],
                                  length=("train.epochs", "24"))
    assert not peaked.weak and peaked.values["val_AP_best_step"] == 1000
    assert not dg.val_curve_finding([], length=("train.epochs", "24")).weak


def test_decoder_layer_findings():
    assert dg.layer_finding([0.1, 0.2, 0.35], 3).verdict.endswith("model.dec_layers to 5")
    assert dg.layer_finding([0.1, 0.4, 0.3], 3).verdict.endswith("model.dec_layers to 2")
    steady = dg.layer_finding([0.3, 0.33, 0.335], 3)
    assert not steady.weak and steady.values["AP_layer_2"] == 0.335


# ---- the whole diagnosis on a tiny trained model ---------------------------------------------

def test_a_model_that_cannot_see_its_objects(tiny_checkpoint, tiny_dataset):
    """The tiny model ends at layer4 (stride 32): on 64 px images its 14-40 px objects are
    under one cell, and the diagnosis says so, with every decoder layer's AP."""
    from detr.config import DataConfig, TrainConfig
    from pipelines.measurement import measure
    from pipelines.params import EvaluateConfig

    settings = {"cfg": EvaluateConfig(batch_size=4),
                "data_cfg": DataConfig(scales=(64,), max_size=64, num_workers=0),
                "train_cfg": TrainConfig(device="cpu", precision="fp32", channels_last=False)}
    measured = measure(tiny_checkpoint, tiny_dataset, layers=True, **settings)
    assert len(measured.layer_predictions) == measured.model_cfg.dec_layers
    assert measured.layer_predictions[-1] is measured.predictions
    plain = measure(tiny_checkpoint, tiny_dataset, **settings)  # the register stage's call
    assert plain.layer_predictions is None
    assert plain.evaluation.stats == measured.evaluation.stats
    stride = measured.model.backbone[0].stride
    assert stride == 32
    result = dg.diagnose(measured.val.coco, measured.predictions, params=measured.params,
                         stride=stride, ap=measured.evaluation.stats["AP"],
                         layer_predictions=measured.layer_predictions, losses=[3.0, 2.0, 1.0],
                         val_curve=[(1, 0.0)], score_threshold=0.5)
    size = result.findings[0]
    assert size.name == "object_size" and size.weak
    assert "turn: data.scales to [" in size.verdict
    metrics = result.metrics()
    for name in ("diag_class_agnostic_AP", "diag_recall_iou10", "diag_AP_layer_0",
                 "diag_AP_layer_1", "diag_duplicates_0.5", "diag_under_one_cell"):
        assert name in metrics
    assert metrics["diag_AP_layer_1"] == pytest.approx(measured.evaluation.stats["AP"])
    assert result.to_dict()["verdicts"] == result.verdicts() and result.verdicts()


def test_stage_reads_the_val_curve_and_prints_verdicts_first(tmp_path):
    from pipelines.reporting.diagnosis import format_diagnosis
    from pipelines.reporting.plots import read_val_curve

    (tmp_path / "val_ap.csv").write_text("step,epoch,AP,AP50\n500,1,0.1,0.2\n1000,3,0.25,0.4\n")
    assert read_val_curve(tmp_path / "val_ap.csv") == [(500, 0.1), (1000, 0.25)]
    assert read_val_curve(tmp_path / "absent.csv") == []
    (tmp_path / "bad.csv").write_text("epoch,loss\n1,2.0\n")
    assert read_val_curve(tmp_path / "bad.csv") == []
    text = format_diagnosis(dg.Diagnosis((
        dg.val_curve_finding(read_val_curve(tmp_path / "val_ap.csv"),
                             length=("train.epochs", "24")),
        dg.loss_finding([1.0, 1.0, 1.0], length=("train.epochs", "24")))))
    lines = text.splitlines()
    assert lines[:2] == ["Diagnosis:", "  found: val AP still rose at the last evaluation "
                                       "(0.100 -> 0.250): train longer; turn: train.epochs to 24"]
    assert lines[2] == "Measured:" and len(lines) == 5


@pytest.mark.parametrize("height, width", [(320, 480), (100, 400), (256, 256)])
def test_val_scale_is_the_val_transforms(height, width):
    from detr.data.transforms import make_transforms
    from tests.unit.test_transforms import _sample

    image = make_transforms("val", scales=(112, 128), max_size=200)(*_sample(height, width, []))[0]
    factor = dg.val_scale(height, width, (112, 128), 200)
    assert tuple(image.shape[-2:]) == (int(height * factor), int(width * factor))


def test_with_tiled_prediction_sizes_are_measured_at_the_tiles_resize():
    gt = make_gt([(1, 1, [100, 100, 18, 18])], size=640)
    whole = dg.object_cells(gt, scales=[256], max_size=256, stride=8)[0]
    tiled = dg.object_cells(gt, scales=[256], max_size=256, stride=8, tile=192)[0]
    assert whole[0] == pytest.approx(18 * 256 / 640 / 8)  # 0.9 cells: "cannot see them"
    assert tiled[0] == pytest.approx(18 * 256 / 192 / 8)  # 3 cells: what the model saw
    finding = dg.size_finding(tiled, tiled, scales=[256], max_size=256, stride=8,
                              last_stage="layer2", tile=192)
    assert not finding.weak and "tiles of 192 px" in finding.summary
