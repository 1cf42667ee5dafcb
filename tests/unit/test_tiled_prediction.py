"""Tiled prediction: detr.data.tiling.predict_tiles with a fake detector that sees exactly the
pixels of each tile, and Predictor.predict(tile=...) with a tiny trained model."""

from __future__ import annotations

import json

import pytest
import torch

from detr.data.tiling import TileOptions, predict_tiles
from detr.inference import Predictor, load_image


def _scene(height: int, width: int, objects: list[list[int]]) -> torch.Tensor:
    """A [3, H, W] uint8 image; object k (1-based) paints its xyxy box with value k."""
    pixels = torch.zeros(3, height, width, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(objects, start=1):
        pixels[:, y1:y2, x1:x2] = k
    return pixels


def fake_detector(calls: list[int] | None = None):
    """A detector that finds every painted object in what it is shown, whole or cut: its box
    (the painted pixels' extent, in the crop's pixels), label 1, score 0.5 + 0.4 x the
    fraction of a 40 x 40 object it sees (fragments score lower, as with a real model)."""
    def raw(crops: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if calls is not None:
            calls.append(len(crops))
        out = []
        for crop in crops:
            boxes, scores = [], []
            for k in crop[0].unique().tolist():
                if k == 0:
                    continue
                ys, xs = torch.nonzero(crop[0] == k, as_tuple=True)
                box = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
                boxes.append(box)
                scores.append(0.5 + 0.4 * min(1.0, len(xs) / 1600))
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.tensor(scores), "labels": torch.ones(len(boxes)).long()})
        return out
    return raw


def test_an_object_cut_by_a_tile_border_is_found_once_in_image_pixels():
    """Tiles of 128 with overlap 0.5 on 256 px start at 0, 64, 128: the object at x 110..150
    is cut by the borders at 128 and 192 yet whole in the tile at 64."""
    objects = [[110, 20, 150, 60], [10, 200, 30, 220], [200, 100, 240, 140]]
    pixels = _scene(256, 256, objects)
    calls: list[int] = []
    found = predict_tiles(fake_detector(calls), pixels, TileOptions(size=128, overlap=0.5),
                          batch_size=4)
    assert calls == [4, 4, 1]  # 9 tiles, 4 at a time
    assert len(found["scores"]) == len(objects)
    got = sorted(found["boxes"].tolist())
    assert got == sorted([[float(v) for v in box] for box in objects])
    assert found["scores"].tolist() == sorted(found["scores"].tolist(), reverse=True)


def test_iou_merging_would_keep_the_fragment():
    pixels = _scene(256, 256, [[110, 20, 150, 60]])
    found = predict_tiles(fake_detector(), pixels,
                          TileOptions(size=128, overlap=0.5, match="iou"))
    assert len(found["scores"]) > 1  # why ios is the default


def test_whole_image_pass_is_merged_in():
    objects = [[20, 20, 60, 60]]
    calls: list[int] = []
    found = predict_tiles(fake_detector(calls), _scene(200, 200, objects),
                          TileOptions(size=128, overlap=0.2, whole=True), batch_size=8)
    assert calls == [4, 1]
    assert found["boxes"].tolist() == [[20.0, 20.0, 60.0, 60.0]]


def test_an_image_that_fits_in_a_tile_is_predicted_as_it_is():
    pixels = _scene(100, 120, [[90, 10, 120, 40]])
    calls: list[int] = []
    found = predict_tiles(fake_detector(calls), pixels, TileOptions(size=128))
    assert calls == [1]
    assert found["boxes"].tolist() == [[90.0, 10.0, 120.0, 40.0]]


def test_the_score_threshold_applies_before_merging():
    pixels = _scene(256, 256, [[110, 20, 150, 60]])
    found = predict_tiles(fake_detector(), pixels, TileOptions(size=128, overlap=0.5),
                          score_threshold=0.95)
    assert len(found["scores"]) == 0


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu", score_threshold=0.0)


def test_predictor_tiled_detections_keep_the_contract(predictor, tiny_dataset):
    image = sorted((tiny_dataset / "images" / "val").glob("*.jpg"))[0]
    plain = predictor.predict(image)[0]
    height, width = plain.image_size
    big = torch.nn.functional.interpolate(
        load_image(image)[None].float(), scale_factor=3)[0].to(torch.uint8)
    tiled = predictor.predict(big, tile=predictor.tiling(64, overlap=0.25), top_k=50)[0]
    assert tiled.image_size == (3 * height, 3 * width)
    assert 0 < len(tiled) <= 50
    boxes = tiled.boxes
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 3 * width).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 3 * height).all()
    assert tiled.scores.tolist() == sorted(tiled.scores.tolist(), reverse=True)
    assert tiled.names == [predictor.category_names[c] for c in tiled.labels.tolist()]
    same = predictor.predict(image, tile=predictor.tiling("auto"))[0]  # fits in one tile
    assert torch.equal(same.boxes, plain.boxes) and torch.equal(same.scores, plain.scores)


def test_auto_tile_size_is_the_val_scale(predictor):
    assert predictor.tiling("auto").size == min(predictor.scale, predictor.max_size) == 64
    assert predictor.tiling("96", overlap=0.1) == TileOptions(size=96, overlap=0.1)



def test_a_perfect_tile_detector_gives_a_perfect_ap_on_whole_images(tmp_path):
    """Objects everywhere, many cut by tile borders: merged by IoS, every object once, in its
    exact place (AP 1); by IoU, small fragments survive as false positives (here they score
    below every whole object, so AP does not show them; a real model's fragments may not)."""
    from detr.evaluation import evaluate_detections

    gen = torch.Generator().manual_seed(1)
    objects = []
    for row in range(6):
        for col in range(6):  # a 6 x 6 grid of 24..44 px objects, jittered
            x, y = 8 + col * 64 + int(torch.randint(0, 12, (1,), generator=gen)), 8 + row * 64
            side = int(torch.randint(24, 45, (1,), generator=gen))
            objects.append([x, y, x + side, y + side])
    pixels = _scene(400, 400, objects)
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 400, "height": 400}],
          "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                           "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
                          for i, (x1, y1, x2, y2) in enumerate(objects)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    found = {match: predict_tiles(fake_detector(), pixels,
                                  TileOptions(size=128, overlap=0.4, match=match))
             for match in ("ios", "iou")}
    assert len(found["ios"]["scores"]) == len(objects) < len(found["iou"]["scores"])
    stats = evaluate_detections(tmp_path / "gt.json", {1: found["ios"]}).stats
    assert stats["AP"] == pytest.approx(1.0) and stats["AR_100"] == pytest.approx(1.0)
