"""Masks out of a segmentation DETR: geometry of the logits' upsampling, the Predictor's masks
and panoptic maps, NMS dropping masks with boxes, COCO RLE in the serialisations."""

from __future__ import annotations

import pytest
import torch

from detr.inference import Detections, Predictor
from detr.masks_out import masks_for, rle_decode
from detr.segm_evaluation import encode_masks
from tests.fake_segmentation import fake_segmentation


@pytest.fixture(scope="module")
def predictor():
    return Predictor(fake_segmentation(), scale=64, max_size=96, device="cpu",
                     score_threshold=0.0, top_k=5, stuff_ids=[3])


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=generator),
            torch.randint(0, 256, (3, 90, 40), dtype=torch.uint8, generator=generator)]


def _grid_outputs() -> dict:
    """Two queries on a 6 x 8 grid (a padded 24 x 32 batch): query 0 covers the top-left
    3 x 4 cells (12 x 16 px of input), query 1 nothing."""
    logits = torch.full((1, 2, 6, 8), -10.0)
    logits[0, 0, :3, :4] = 10.0
    return {"pred_masks": logits}


def test_masks_are_upsampled_cropped_to_the_input_and_resized_to_the_original():
    # input 20 x 28 inside the padded 24 x 32, original image twice as large
    masks = masks_for(_grid_outputs(), [torch.tensor([1, 0])], [(20, 28)], [(40, 56)])[0]
    assert masks.shape == (2, 40, 56) and masks.dtype == torch.bool
    assert not masks[0].any()  # row 0 = query 1
    # query 0: 12 x 16 input px = 24 x 32 original px (bilinear: the edge within 2 px)
    assert masks[1, :22, :30].all() and not masks[1, 26:].any() and not masks[1, :, 34:].any()


@pytest.mark.parametrize(("input_height", "orig_height"), [(44, 251), (56, 230), (60, 77)])
def test_masks_have_the_original_size_where_float_rounding_would_cut_a_pixel(input_height,
                                                                             orig_height):
    # floor(cells * 4 * 251 / 44) is 250 in floating point: the scale is nudged up
    rows = -(-input_height // 4)
    outputs = {"pred_masks": torch.ones((1, 1, rows, 3))}
    masks = masks_for(outputs, [torch.tensor([0])], [(input_height, 12)], [(orig_height, 30)])
    assert masks[0].shape == (1, orig_height, 30) and masks[0].all()


def test_no_kept_query_gives_an_empty_mask_stack():
    masks = masks_for(_grid_outputs(), [torch.tensor([], dtype=torch.long)], [(20, 28)],
                      [(40, 56)])[0]
    assert masks.shape == (0, 40, 56)


def test_a_grid_that_does_not_cover_the_input_is_refused():
    with pytest.raises(ValueError, match="grid"):
        masks_for(_grid_outputs(), [torch.tensor([0])], [(30, 28)], [(30, 28)])


def test_predictor_masks_follow_the_detections(predictor, images):
    found = predictor.predict(images)
    for det, image in zip(found, images, strict=True):
        height, width = image.shape[-2:]
        assert det.masks.shape == (len(det), height, width) and det.masks.dtype == torch.bool
        assert det.masks.any() and not det.masks.all()
        assert det.panoptic is None


def test_nms_drops_the_masks_of_the_boxes_it_drops(images):
    model = fake_segmentation()
    plain = Predictor(model, scale=64, max_size=96, device="cpu", score_threshold=0.0,
                      top_k=100).predict(images[:1])[0]
    nms = Predictor(model, scale=64, max_size=96, device="cpu", score_threshold=0.0,
                    top_k=100, nms=0.3).predict(images[:1])[0]
    assert len(nms) < len(plain) and len(nms.masks) == len(nms)
    for box, mask in zip(nms.boxes, nms.masks, strict=True):
        row = (plain.boxes - box).abs().sum(dim=1).argmin()
        assert torch.equal(plain.masks[row], mask)


def test_tiling_a_segmentation_model_is_refused_by_name(predictor, images):
    with pytest.raises(ValueError, match="tile"):
        predictor.predict(images[0], tile=predictor.tiling(32))


def test_panoptic_needs_a_mask_head(images):
    from detr.models.detr import build_model
    from tests.conftest import TINY

    boxes_only = Predictor(build_model(TINY), scale=64, max_size=96, device="cpu")
    assert not boxes_only.has_masks
    with pytest.raises(ValueError, match="panoptic"):
        boxes_only.predict(images[0], panoptic=True)


def test_panoptic_map_matches_its_segments_info(predictor, images):
    det = predictor.predict(images[0], panoptic=True)[0]
    segments, info = det.panoptic["segments"], det.panoptic["segments_info"]
    assert segments.shape == images[0].shape[-2:] and segments.dtype == torch.int32
    assert [s["id"] for s in info] == list(range(1, len(info) + 1))
    for s in info:
        assert (segments == s["id"]).sum() == s["area"] > 0
        assert s["isthing"] == int(s["category_id"] != 3)
    assert set(segments.unique().tolist()) <= {0, *(s["id"] for s in info)}


def test_rle_round_trip_and_serialisations():
    masks = torch.zeros(2, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 4, :] = True
    rles = encode_masks(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [5, 7] for r in rles)
    assert all(torch.equal(rle_decode(r), m) for r, m in zip(rles, masks, strict=True))
    det = Detections(torch.tensor([[2.0, 1, 6, 3], [0, 4, 7, 5]]), torch.tensor([0.9, 0.6]),
                     torch.tensor([1, 2]), ["a", "b"], (5, 7), masks=masks)
    assert [r["segmentation"] for r in det.to_coco(3)] == rles
    assert [r["segmentation"] for r in det.to_records()] == rles
    boxes_only = Detections(det.boxes, det.scores, det.labels, det.names, (5, 7))
    assert all("segmentation" not in r for r in boxes_only.to_records() + boxes_only.to_coco(3))
    assert boxes_only.rles() is None


def test_stuff_classes_come_from_the_label_map(tiny_checkpoint, tmp_path):
    ckpt = torch.load(tiny_checkpoint, weights_only=False)
    ckpt["label_map"]["categories"][1]["isthing"] = 0
    ckpt["label_map"]["categories"][0]["isthing"] = 1
    path = tmp_path / "stuff.pth"
    torch.save(ckpt, path)
    stuff_id = ckpt["label_map"]["categories"][1]["id"]
    assert Predictor.from_checkpoint(path, device="cpu").stuff_ids == {stuff_id}
    assert Predictor.from_checkpoint(tiny_checkpoint, device="cpu").stuff_ids == set()


def test_attention_of_a_segmentation_model_is_its_detectors(predictor, images):
    found = predictor.attention(images[0], top_k=2)
    assert len(found) == 2 and found[0].heat.shape == images[0].shape[-2:]
