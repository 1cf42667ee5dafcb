"""pipelines.reporting.segmentation: the evaluate stage's mask AP and PQ from hand-made
predictions (the model side's contract), the files, MLflow metrics and table rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detr.panoptic_quality import STAT_NAMES as PQ_NAMES
from detr.segm_evaluation import MASK_STAT_NAMES, encode_masks
from pipelines.reporting.segmentation import (
    SegmentationResults,
    evaluate_segmentation,
    panoptic_rows,
    segmentation_metrics,
    segmentation_text,
    write_segmentation,
)

H, W = 40, 60
CATS = [{"id": 1, "name": "person", "isthing": 1}, {"id": 7, "name": "sky/sea", "isthing": 0}]
LABELS = {1: "person", 7: "sky/sea"}
PERSON, SKY = (0, 20, 0, 30), (20, 40, 0, 60)  # y0, y1, x0, x1


def rect(y0, y1, x0, x1):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture
def val_json(tmp_path):
    """Image 3: a person and the sky below it (void elsewhere), as polygons."""
    anns = [{"id": n, "image_id": 3, "category_id": cat, "iscrowd": 0,
             "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)}
            for n, (cat, (y0, y1, x0, x1)) in enumerate([(1, PERSON), (7, SKY)], start=1)]
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"images": [{"id": 3, "height": H, "width": W,
                                            "file_name": "3.png"}],
                                "categories": CATS, "annotations": anns}))
    return path


def predictions(person=PERSON, *, rle=False):
    masks = np.stack([rect(*person), rect(*SKY)])
    segments = np.zeros((H, W), np.int32)
    segments[rect(*SKY)] = 2
    segments[rect(*person)] = 1
    return {3: {"boxes": np.array([[0, 0, 30, 20], [0, 20, 60, 40]], float),
                "scores": np.array([0.9, 0.8]), "labels": np.array([1, 7]),
                "masks": encode_masks(masks) if rle else masks,
                "panoptic": {"segments": segments, "segments_info": [
                    {"id": 1, "category_id": 1, "isthing": True, "score": 0.9, "area": 0},
                    {"id": 2, "category_id": 7, "isthing": False, "score": 0.8, "area": 0}]}}}


def test_perfect_prediction_scores_one_everywhere(val_json, tmp_path):
    results = evaluate_segmentation(predictions(rle=True), val_json)
    assert results.masks.stats["mask_AP"] == pytest.approx(1.0)
    assert results.panoptic.stats == pytest.approx(dict.fromkeys(PQ_NAMES, 1.0))
    write_segmentation(results, LABELS, metrics_dir=tmp_path / "m", report_dir=tmp_path / "r")
    segm = json.loads((tmp_path / "m" / "segm.json").read_text())
    assert list(segm) == list(MASK_STAT_NAMES)
    assert list(json.loads((tmp_path / "m" / "panoptic.json").read_text())) == list(PQ_NAMES)
    assert len((tmp_path / "r" / "mask_table.txt").read_text().splitlines()) == 12
    per_class = json.loads((tmp_path / "r" / "per_class_pq.json").read_text())
    assert per_class["sky/sea"]["PQ"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "r" / "per_class_mask_ap.json").read_text()) == \
        pytest.approx({"person": 1.0, "sky/sea": 1.0})


def test_shifted_person_gives_the_hand_computed_pq(val_json):
    # shifted 10 of 30 columns: 400 px on the person, 200 on void (right of it), which leave
    # the union: IoU 400 / (600 + 600 - 400 - 200) = 2/3, a match
    results = evaluate_segmentation(predictions((0, 20, 10, 40)), val_json)
    assert results.panoptic.stats["PQ_th"] == pytest.approx(2 / 3)
    assert results.panoptic.stats["PQ_st"] == pytest.approx(1.0)
    assert results.panoptic.stats["PQ"] == pytest.approx((2 / 3 + 1) / 2)
    # shifted 15: 300 on the person, 300 on void: IoU 300 / 600 = 0.5, no match; half on
    # void is not more than half: a false positive, and the person a false negative
    results = evaluate_segmentation(predictions((0, 20, 15, 45)), val_json)
    person = results.panoptic.per_class[1]
    assert (person["TP"], person["FP"], person["FN"]) == (0, 1, 1)
    assert results.panoptic.stats["PQ"] == pytest.approx(0.5)


def test_detection_predictions_measure_nothing_and_claim_nothing(val_json, tmp_path):
    boxes_only = {3: {k: v for k, v in predictions()[3].items() if k in ("boxes", "scores",
                                                                       "labels")}}
    results = evaluate_segmentation(boxes_only, val_json)
    assert not results and results == SegmentationResults()
    earlier = evaluate_segmentation(predictions(), val_json)  # a segmentation model's files
    write_segmentation(earlier, LABELS, metrics_dir=tmp_path / "m", report_dir=tmp_path / "r")
    write_segmentation(results, LABELS, metrics_dir=tmp_path / "m", report_dir=tmp_path / "r")
    assert json.loads((tmp_path / "m" / "segm.json").read_text()) == {}
    assert json.loads((tmp_path / "m" / "panoptic.json").read_text()) == {}
    assert list((tmp_path / "r").iterdir()) == []  # not left to be read as this run's
    assert segmentation_metrics(results, LABELS) == {} and segmentation_text(results) == ""


def test_mlflow_metrics_leave_out_undefined_and_name_classes_safely(val_json):
    metrics = segmentation_metrics(evaluate_segmentation(predictions(), val_json), LABELS)
    assert metrics["mask_AP"] == pytest.approx(1.0) and "mask_AP_large" not in metrics  # -1
    assert metrics["PQ_class_sky_sea"] == pytest.approx(1.0)
    assert metrics["mask_AP_class_person"] == pytest.approx(1.0)
    assert metrics["PQ_st"] == pytest.approx(1.0)


def test_panoptic_rows_means_then_classes(val_json):
    results = evaluate_segmentation(predictions(), val_json)
    rows = panoptic_rows(results.panoptic, LABELS)
    assert [(r["class"], r["kind"]) for r in rows] == [
        ("all", "mean"), ("things", "mean"), ("stuff", "mean"), ("person", "thing"),
        ("sky/sea", "stuff")]
    assert rows[3]["TP"] == 1 and isinstance(rows[3]["TP"], int)
    assert rows[0]["TP"] is None
    text = segmentation_text(results)
    assert "mask_" not in text and "Panoptic quality" in text and "100.0" in text


def test_a_bad_mask_size_names_the_image(val_json):
    bad = predictions()
    bad[3]["masks"] = np.zeros((2, H, W + 1), bool)
    with pytest.raises(ValueError, match="masks of image 3"):
        evaluate_segmentation(bad, val_json)


def test_the_champions_measurement_carries_its_mask_and_pq_statistics(val_json, tmp_path,
                                                                       monkeypatch):
    """register.metric may be a mask or PQ statistic: the champion, measured again on
    today's val split, must have it too (pipelines.registry.champion)."""
    from pycocotools.coco import COCO

    from detr.evaluation import evaluate_detections
    from pipelines.params import EvaluateConfig
    from pipelines.registry import champion

    gt = COCO(str(val_json))
    found = predictions(rle=True)

    class Measured:
        predictions = found
        evaluation = evaluate_detections(gt, found)
        val = type("Val", (), {"coco": gt})()

    monkeypatch.setattr(champion, "_download", lambda name, version, dst: dst / "ckpt.pth")
    monkeypatch.setattr(champion, "measure", lambda *a, **k: Measured)
    monkeypatch.setattr(champion, "with_tile", lambda cfg, dataset_dir: cfg)
    result = champion.measure_champion("m", 1, dataset_dir=tmp_path, dataset_md5=None,
                                       cfg=EvaluateConfig(), data_cfg=None, train_cfg=None)
    assert result["stats"]["mask_AP"] == pytest.approx(1.0)
    assert result["stats"]["PQ"] == pytest.approx(1.0)
    assert "AP" in result["stats"]
