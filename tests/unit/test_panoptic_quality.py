"""detr.panoptic_quality on hand-made segment maps whose PQ is worked out by hand, and against
a per-segment loop written from panopticapi's definition on random maps."""

import json

import numpy as np
import pytest

from detr.evaluation import load_ground_truth
from detr.panoptic_quality import (
    STAT_NAMES,
    PanopticAccumulator,
    evaluate_panoptic,
    format_panoptic,
    gt_panoptic_map,
    image_counts,
)

H, W = 20, 60
CATS = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "car", "isthing": 1},
        {"id": 3, "name": "sky", "isthing": 0}]


def seg_map(*rects):
    """A map with segment k+1 on rects[k] = (y0, y1, x0, x1); later rects paint over."""
    out = np.zeros((H, W), np.int32)
    for k, (y0, y1, x0, x1) in enumerate(rects, start=1):
        out[y0:y1, x0:x1] = k
    return out


def info(*cats, crowd=()):
    return [{"id": k, "category_id": c, "iscrowd": int(k in crowd)}
            for k, c in enumerate(cats, start=1)]


def pq(gt_map, gt_info, pred_map, pred_info, cats=CATS):
    acc = PanopticAccumulator(cats)
    acc.add(gt_map, gt_info, pred_map, pred_info, image_id=1)
    return acc.result()


def test_perfect_prediction_is_one():
    gt = seg_map((0, 10, 0, 20), (10, 20, 0, 60))
    result = pq(gt, info(1, 3), gt, info(1, 3))
    assert tuple(result.stats) == STAT_NAMES
    assert all(v == pytest.approx(1.0) for v in result.stats.values())
    assert result.per_class[2] is None  # no car anywhere: not averaged


def on_sky(person):
    """Sky (segment 1, stuff) everywhere, a person (segment 2) on ``person``: no void."""
    return seg_map((0, H, 0, W), person), info(3, 1)


def test_iou_0_6_is_a_true_positive_pq_0_6():
    # gt 10x20 at columns 0-19, pred at 5-24: intersection 150, union 250 -> IoU 0.6
    result = pq(*on_sky((0, 10, 0, 20)), *on_sky((0, 10, 5, 25)))
    assert result.per_class[1] == pytest.approx({"PQ": 0.6, "SQ": 0.6, "RQ": 1.0, "TP": 1,
                                                 "FP": 0, "FN": 0})
    assert result.stats["PQ_th"] == pytest.approx(0.6)
    # sky: 1000 pixels each, intersection 1200 - 250 = 950: IoU 950 / 1050
    assert result.stats["PQ_st"] == pytest.approx(950 / 1050)
    assert result.stats["PQ"] == pytest.approx((0.6 + 950 / 1050) / 2)


def test_iou_one_third_is_a_false_positive_and_a_false_negative():
    # columns 0-19 against 10-29: intersection 100, union 300
    result = pq(*on_sky((0, 10, 0, 20)), *on_sky((0, 10, 10, 30)))
    assert result.per_class[1] == {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "TP": 0, "FP": 1, "FN": 1}
    assert result.stats["PQ_th"] == 0.0


def test_iou_exactly_one_half_does_not_match():
    # columns 0-19 against 0-39: 200 / 400; the match needs IoU > 0.5
    result = pq(*on_sky((0, 10, 0, 20)), *on_sky((0, 10, 0, 40)))
    assert result.per_class[1] == {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "TP": 0, "FP": 1, "FN": 1}


def test_pred_pixels_on_void_leave_the_union():
    # the same pred of 400 pixels, half on void: IoU 200 / (200 + 400 - 200 - 200) = 1
    result = pq(seg_map((0, 10, 0, 20)), info(1), seg_map((0, 10, 0, 40)), info(1))
    assert result.stats["PQ"] == pytest.approx(1.0)


def test_unmatched_pred_mostly_on_void_is_not_a_false_positive():
    gt = seg_map((0, 10, 0, 20))
    on_void = seg_map((0, 10, 0, 20), (10, 20, 30, 60))  # car entirely on void
    assert pq(gt, info(1), on_void, info(1, 2)).per_class[2] is None
    # a car 10x10 with 4 columns (40%) on void and 6 on the person: a false positive
    pred = seg_map((0, 10, 6, 20), (0, 10, 0, 6))
    pred[0:10, 20:24] = 2
    result = pq(gt, info(1), pred, info(1, 2))
    assert result.per_class[2]["FP"] == 1


def test_crowd_absorbs_predictions_of_its_category_only():
    # person 1 (cols 0-9), person crowd (cols 20-49), sky (rows 10-19)
    gt = seg_map((0, 10, 0, 10), (0, 10, 20, 50), (10, 20, 0, 60))
    gt_info = info(1, 1, 3, crowd=(2,))
    # person matched; a person in the crowd: ignored; a car in the crowd: a false positive
    pred = seg_map((0, 10, 0, 10), (0, 10, 20, 30), (0, 10, 35, 45), (10, 20, 0, 60))
    result = pq(gt, gt_info, pred, info(1, 1, 2, 3))
    assert result.per_class[1] == pytest.approx({"PQ": 1.0, "SQ": 1.0, "RQ": 1.0, "TP": 1,
                                                 "FP": 0, "FN": 0})  # crowd: no FN either
    assert result.per_class[2]["FP"] == 1


def test_things_and_stuff_are_averaged_apart():
    gt = seg_map((0, 10, 0, 20), (10, 20, 0, 20))  # person; sky 10x20
    pred = seg_map((0, 10, 0, 20), (10, 20, 5, 25))  # sky IoU 0.6 (void beyond col 20)
    pred_info = info(1, 3)
    # the sky pred's 50 pixels on void leave the union: 150 / (200 + 200 - 150 - 50) = 0.75
    result = pq(gt, info(1, 3), pred, pred_info)
    assert result.stats["PQ_th"] == pytest.approx(1.0)
    assert result.stats["PQ_st"] == pytest.approx(0.75)
    assert result.stats["PQ"] == pytest.approx((1.0 + 0.75) / 2)
    assert result.stats["RQ_st"] == pytest.approx(1.0)


def test_no_stuff_leaves_the_stuff_numbers_undefined():
    gt = seg_map((0, 10, 0, 20))
    result = pq(gt, info(1), gt, info(1))
    assert result.stats["PQ_st"] == -1.0 and result.stats["PQ"] == 1.0
    assert "n/a" in format_panoptic(result)


def test_empty_prediction_counts_every_segment_as_missed():
    gt = seg_map((0, 10, 0, 20), (10, 20, 0, 60))
    result = pq(gt, info(1, 3), np.zeros_like(gt), [])
    assert result.stats == {name: 0.0 for name in STAT_NAMES}
    assert result.per_class[3]["FN"] == 1


def test_counts_add_up_over_images_before_averaging():
    acc = PanopticAccumulator(CATS)
    gt = seg_map((0, 10, 0, 20))
    acc.add(gt, info(1), gt, info(1))  # TP
    acc.add(gt, info(1), np.zeros_like(gt), [])  # FN
    assert acc.result().per_class[1]["PQ"] == pytest.approx(1 / 1.5)
    assert acc.num_images == 2


def test_malformed_input_names_the_image():
    gt = seg_map((0, 10, 0, 20))
    with pytest.raises(ValueError, match=r"image 9: pred map has segment ids \[1\]"):
        image_counts(gt, info(1), gt, [], image_id=9)
    with pytest.raises(ValueError, match="image 9: .*category ids \\[7\\]"):
        image_counts(gt, info(1), gt, info(7), image_id=9, category_ids={1, 2, 3})
    with pytest.raises(ValueError, match="image 9: gt map"):
        image_counts(gt, info(1), gt[:5], info(1), image_id=9)


def reference_counts(gt_map, gt_info, pred_map, pred_info):
    """Per-segment loops straight from the definition (panopticapi's steps)."""
    gt_segs = {s["id"]: s for s in gt_info}
    pred_segs = {s["id"]: s for s in pred_info}
    area = {("g", i): int((gt_map == i).sum()) for i in gt_segs}
    area.update({("p", j): int((pred_map == j).sum()) for j in pred_segs})
    counts, gt_hit, pred_hit = {}, set(), set()

    def bump(cat, k, value=1.0):
        counts.setdefault(cat, np.zeros(4))[k] += value

    for i, g in gt_segs.items():
        for j, p in pred_segs.items():
            if g["iscrowd"] or g["category_id"] != p["category_id"]:
                continue
            inter = int(((gt_map == i) & (pred_map == j)).sum())
            void = int(((gt_map == 0) & (pred_map == j)).sum())
            union = area[("g", i)] + area[("p", j)] - inter - void
            if union and inter / union > 0.5:
                bump(g["category_id"], 0)
                bump(g["category_id"], 3, inter / union)
                gt_hit.add(i)
                pred_hit.add(j)
    for i, g in gt_segs.items():
        if i not in gt_hit and not g["iscrowd"]:
            bump(g["category_id"], 2)
    for j, p in pred_segs.items():
        if j in pred_hit or not area[("p", j)]:
            continue
        crowd = [i for i, g in gt_segs.items()
                 if g["iscrowd"] and g["category_id"] == p["category_id"]]
        ignored = int(((pred_map == j) & np.isin(gt_map, [0, *crowd])).sum())
        if ignored / area[("p", j)] <= 0.5:
            bump(p["category_id"], 1)
    return counts


def random_image(rng, num_segments):
    """A map painted with random rectangles (void stays where none falls)."""
    out = np.zeros((H, W), np.int32)
    segments = []
    for k in range(1, num_segments + 1):
        y0, x0 = rng.integers(0, H - 2), rng.integers(0, W - 2)
        out[y0:rng.integers(y0 + 1, H + 1), x0:rng.integers(x0 + 1, W + 1)] = k
        segments.append({"id": k, "category_id": int(rng.integers(1, 4)),
                         "iscrowd": int(rng.random() < 0.15)})
    present = set(np.unique(out).tolist())
    return out, [s for s in segments if s["id"] in present]


def perturbed(rng, gt_map, gt_info):
    """A prediction near the ground truth: its segments renumbered, a category changed now
    and then, and a few random rectangles painted over (new segments)."""
    pred = np.where(gt_map > 0, gt_map + 10, 0).astype(np.int32)
    segments = [{"id": s["id"] + 10, "category_id": s["category_id"] if rng.random() < 0.8
                 else int(rng.integers(1, 4))} for s in gt_info]
    extra, extra_info = random_image(rng, 3)
    pred = np.where(extra > 0, extra, pred).astype(np.int32)
    segments += [{"id": s["id"], "category_id": s["category_id"]} for s in extra_info]
    present = set(np.unique(pred).tolist())
    return pred, [s for s in segments if s["id"] in present]


@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_the_loop_definition_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    gt_map, gt_info = random_image(rng, 6)
    pred_map, pred_info = perturbed(rng, gt_map, gt_info)
    got = image_counts(gt_map, gt_info, pred_map, pred_info)
    expected = reference_counts(gt_map, gt_info, pred_map, pred_info)
    assert sorted(c for c, v in got.items() if v[:3].any()) == sorted(expected)
    for cat, values in expected.items():
        assert got[cat] == pytest.approx(values), cat


def test_random_cases_cover_every_rule():
    """The random cases above reach true positives, false positives and negatives."""
    totals = np.zeros(4)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        gt_map, gt_info = random_image(rng, 6)
        totals += sum(reference_counts(gt_map, gt_info, *perturbed(rng, gt_map, gt_info))
                      .values(), np.zeros(4))
    assert (totals[:3] >= 10).all(), totals


def canonical_gt(tmp_path, annotations):
    """The canonical val json with ``annotations`` on image 5, loaded as the stage loads it."""
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"images": [{"id": 5, "height": H, "width": W,
                                            "file_name": "5.png"}],
                                "categories": CATS, "annotations": annotations}))
    return load_ground_truth(path)


def ann(ann_id, cat, y0, y1, x0, x1, crowd=0):
    return {"id": ann_id, "image_id": 5, "category_id": cat, "iscrowd": crowd,
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)}


def test_gt_map_from_the_canonical_json(tmp_path):
    coco = canonical_gt(tmp_path, [ann(11, 1, 0, 10, 0, 20), ann(12, 3, 10, 20, 0, 60)])
    segments, segments_info = gt_panoptic_map(coco, 5)
    assert segments.dtype == np.int32 and segments.shape == (H, W)
    assert (segments == seg_map((0, 10, 0, 20), (10, 20, 0, 60))).all()
    assert [s["annotation_id"] for s in segments_info] == [11, 12]
    perfect = {5: {"segments": segments, "segments_info": segments_info}}
    assert evaluate_panoptic(coco, perfect).stats["PQ"] == pytest.approx(1.0)
    assert evaluate_panoptic(coco, {}).stats["PQ"] == 0.0  # no prediction for the image


def test_a_pixel_claimed_twice_names_both_annotations(tmp_path):
    coco = canonical_gt(tmp_path, [ann(11, 1, 0, 10, 0, 20), ann(12, 3, 5, 20, 10, 60)])
    with pytest.raises(ValueError, match="image 5: annotations 11 and 12 claim the same"):
        gt_panoptic_map(coco, 5)
