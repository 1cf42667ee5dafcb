"""Masks: COCO segmentations decoded (polygons, RLE, uncompressed RLE), carried by the dataset
aligned with its boxes, and by the transform presets through flip, resize, crop and sanitize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import v2

from detr.data.coco import AnnotationError, CocoDetection, load_coco
from detr.data.masks import (
    MaskError,
    crop_segmentation,
    decode_segmentation,
    mask_bbox,
    mask_to_rle,
    rle_counts,
    segmentation_area,
)
from detr.data.transforms import RandomSizeCrop, make_transforms

H, W = 30, 40


def _rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _uncompressed(mask: np.ndarray) -> dict:
    flat = np.asfortranarray(mask).ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": [H, W], "counts": runs}


def test_three_forms_decode_to_the_same_mask() -> None:
    polygon = [[5, 4, 15, 4, 15, 12, 5, 12]]  # pycocotools: pixels 5..14 x 4..11
    expected = decode_segmentation(polygon, H, W)
    assert mask_bbox(expected) == [5.0, 4.0, 10.0, 8.0]
    for segm in (mask_to_rle(expected), _uncompressed(expected),
                 {"size": [H, W], "counts": mask_to_rle(expected)["counts"].encode()}):
        decoded = decode_segmentation(segm, H, W)
        assert decoded.dtype == np.uint8 and decoded.flags.c_contiguous
        assert np.array_equal(decoded, expected)
    assert segmentation_area(polygon, H, W) == int(expected.sum())
    assert mask_bbox(np.zeros((3, 3), np.uint8)) is None


def test_crop_segmentation_cuts_the_mask_to_a_tile() -> None:
    polygon = [[5, 4, 15, 4, 15, 12, 5, 12]]
    rle, area = crop_segmentation(polygon, H, W, (10, 8, 20, 10))
    expected = decode_segmentation(polygon, H, W)[8:18, 10:30]
    assert rle["size"] == [10, 20] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_segmentation(rle, 10, 20), expected)
    assert area == int(expected.sum()) == 5 * 4


def test_rle_counts_reads_what_pycocotools_writes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = (rng.random((13, 17)) < rng.random()).astype(np.uint8)
        runs = rle_counts(mask_utils.encode(np.asfortranarray(mask))["counts"])
        flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8)
        assert np.array_equal(flat.reshape(17, 13).T, mask)


@pytest.mark.parametrize(("segm", "words"), [
    ([[1, 2, 3, 4]], "4 coordinates"),
    ([[1, 2, 3, 4, 5]], "5 coordinates"),
    ([[1, 2, 3, "x", 5, 6]], "finite numbers"),
    ({"size": [H, W + 1], "counts": "PP"}, "not the image's"),
    ({"size": [H, W], "counts": "zz"}, "do not decode"),
    ({"size": [H, W], "counts": "1"}, "sum to"),
    ({"size": [H, W], "counts": [5, -1]}, "non-negative"),
    ({"size": [H, W], "counts": [5, 6]}, "sum to"),
    ("polygon", "expected polygons"),
])
def test_undecodable_segmentation_names_the_record(segm, words: str) -> None:
    with pytest.raises(MaskError, match=f"^train.json: annotation 9: segmentation: .*{words}"):
        decode_segmentation(segm, H, W, where="train.json: annotation 9")


def _ann(ann_id: int, bbox: list[float], segm, crowd: int = 0) -> dict:
    ann = {"id": ann_id, "image_id": 1, "category_id": 1 + ann_id % 2, "bbox": bbox,
           "area": bbox[2] * bbox[3], "iscrowd": crowd}
    if segm is not None:
        ann["segmentation"] = segm
    return ann


def _write(root: Path, anns: list[dict]) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.new("RGB", (W, H), (9, 9, 9)).save(root / "images" / "train" / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
            "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "sky", "isthing": 0}]}
    (root / "annotations" / "train.json").write_text(json.dumps(coco))
    return root


GOOD = [
    _ann(1, [5, 4, 10, 8], [[5, 4, 15, 4, 15, 12, 5, 12]]),  # polygon
    _ann(2, [20, 2, 15, 10], mask_to_rle(_rect(20, 2, 35, 12))),  # RLE
    _ann(3, [0, 0, 0, 5], mask_to_rle(_rect(0, 0, 1, 5))),  # zero width: dropped with its box
    _ann(4, [0, 20, 40, 10], _uncompressed(_rect(0, 20, 40, 30))),  # uncompressed RLE
    _ann(5, [1, 1, 4, 4], _uncompressed(_rect(1, 1, 5, 5)), crowd=1),  # crowd: dropped
]


def test_dataset_masks_align_with_boxes(tmp_path: Path) -> None:
    dataset = CocoDetection.from_root(_write(tmp_path, GOOD), "train", masks=True)
    _, target = dataset[0]
    masks, boxes = target["masks"], target["boxes"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8
    assert masks.shape == (3, H, W) and boxes.shape == (3, 4)
    for mask, box in zip(masks, boxes, strict=True):
        x, y, w, h = mask_bbox(mask.numpy())
        assert [x, y, x + w, y + h] == box.tolist()
    assert "masks" not in CocoDetection.from_root(tmp_path, "train")[0][1]


def test_dataset_needs_a_segmentation_per_object(tmp_path: Path) -> None:
    root = _write(tmp_path, [*GOOD[:2], _ann(6, [1, 1, 4, 4], None)])
    CocoDetection.from_root(root, "train")  # boxes alone are fine
    with pytest.raises(AnnotationError, match="annotation 6 of image 1: no segmentation"):
        CocoDetection.from_root(root, "train", masks=True)


def test_undecodable_rle_names_file_annotation_and_field(tmp_path: Path) -> None:
    bad = _ann(7, [1, 1, 4, 4], {"size": [H + 1, W], "counts": "PP"})
    dataset = CocoDetection.from_root(_write(tmp_path, [bad]), "train", masks=True)
    with pytest.raises(AnnotationError, match=r"train.json: annotation 7 of image 1: "
                                              r"segmentation: RLE size \[31, 40\]"):
        dataset[0]


def test_malformed_segmentation_only_matters_with_masks(tmp_path: Path) -> None:
    _write(tmp_path, [_ann(8, [1, 1, 4, 4], [[1, 1, 5, 1]]), _ann(9, [1, 1, 4, 4], [])])
    load_coco(tmp_path / "annotations" / "train.json")  # boxes do not need it
    assert len(CocoDetection.from_root(tmp_path, "train")[0][1]["boxes"]) == 2
    with pytest.raises(AnnotationError, match="annotation 8 of image 1: segmentation: polygon 0"):
        CocoDetection.from_root(tmp_path, "train", masks=True)


# --- transforms ---------------------------------------------------------------------------


def _sample(n_boxes: int = 3) -> tuple:
    """A 60x80 image, XYXY rectangles, their masks painted exactly under them."""
    rects = [(5, 10, 30, 40), (40, 2, 75, 25), (20, 35, 70, 58)][:n_boxes]
    masks = torch.zeros((len(rects), 60, 80), dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(rects, dtype=torch.float32).reshape(-1, 4),
                                          format="XYXY", canvas_size=(60, 80)),
        "labels": torch.arange(len(rects)),
        "image_id": 3,
        "orig_size": torch.tensor([60, 80]),
        "masks": tv_tensors.Mask(masks),
    }
    image = tv_tensors.Image(torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8))
    return image, target


def _without_masks(target: dict) -> dict:
    return {k: v for k, v in target.items() if k != "masks"}


def _box_errors(masks: torch.Tensor, boxes: torch.Tensor) -> list[float]:
    """Per row: the largest distance (px) between the mask's bounding box and the XYXY box
    (a box cropped away, of no area, must have an empty mask)."""
    errors = []
    for mask, box in zip(masks, boxes.tolist(), strict=True):
        if box[2] <= box[0] or box[3] <= box[1]:
            assert not mask.any()
            continue
        x, y, w, h = mask_bbox(np.asarray(mask))
        errors.append(float(np.abs(np.array([x, y, x + w, y + h]) - np.array(box)).max()))
    return errors


STEPS = {
    "flip": v2.RandomHorizontalFlip(p=1.0),
    "resize down": v2.RandomShortestSize([37], max_size=100),
    "resize up": v2.RandomShortestSize([133], max_size=400),
    "crop": RandomSizeCrop(20, 40),
    "crop and sanitize": v2.Compose([RandomSizeCrop(15, 30),
                                     v2.SanitizeBoundingBoxes(labels_getter="default")]),
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("seed", range(6))
def test_each_step_keeps_masks_on_their_boxes(step: str, seed: int) -> None:
    torch.manual_seed(seed)
    _, target = STEPS[step](*_sample())
    assert isinstance(target["masks"], tv_tensors.Mask)
    assert len(target["masks"]) == len(target["boxes"]) == len(target["labels"])
    assert max(_box_errors(target["masks"], target["boxes"]), default=0) <= 1.0


def _pixel_boxes(image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    h, w = image.shape[-2:]
    cx, cy, bw, bh = (boxes * torch.tensor([w, h, w, h])).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


@pytest.mark.parametrize("seed", range(12))
def test_train_preset_keeps_masks_on_their_boxes(seed: int) -> None:
    # Without the crop branch: one resize, so 1 px. With it: a nearest resize before the crop
    # is off by < 1 px of that grid, which the resize after the crop magnifies (here < 3x).
    for crop_scales, tolerance in ((None, 1.0), ([50, 60], 3.0)):
        t = make_transforms("train", scales=[48, 64, 96], max_size=160, crop_scales=crop_scales,
                            crop_size=(35, 40))
        torch.manual_seed(seed)
        image, target = t(*_sample())
        masks, boxes = target["masks"], target["boxes"]
        assert type(masks) is torch.Tensor and masks.dtype == torch.bool
        assert masks.shape == (len(boxes), *image.shape[-2:])
        assert max(_box_errors(masks, _pixel_boxes(image, boxes)), default=0) <= tolerance


@pytest.mark.parametrize("seed", range(6))
def test_maskless_path_unchanged(seed: int) -> None:
    t = make_transforms("train", scales=[48, 64], max_size=160, crop_scales=[50],
                        crop_size=(20, 40))
    image, target = _sample()
    torch.manual_seed(seed)
    with_masks = t(image, target)
    torch.manual_seed(seed)
    without = t(image, _without_masks(target))
    assert torch.equal(with_masks[0], without[0])
    assert set(with_masks[1]) - set(without[1]) == {"masks"}
    for key, value in without[1].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(with_masks[1][key])), key


def test_sanitize_drops_the_mask_rows_of_dropped_boxes() -> None:
    image, target = _sample()
    target["boxes"][1] = torch.tensor([40.0, 2.0, 40.5, 25.0])  # narrower than 1 px
    _, out = v2.SanitizeBoundingBoxes(labels_getter="default")(image, target)
    assert out["labels"].tolist() == [0, 2]
    assert isinstance(out["masks"], tv_tensors.Mask)
    assert torch.equal(out["masks"], target["masks"][[0, 2]])


def test_image_without_objects_keeps_an_empty_mask_stack() -> None:
    t = make_transforms("train", scales=[48], max_size=100, crop_scales=[50], crop_size=(20, 40))
    image, target = _sample(0)
    for seed in range(4):
        torch.manual_seed(seed)
        out_image, out = t(image, target)
        assert out["masks"].shape == (0, *out_image.shape[-2:])
        assert out["masks"].dtype == torch.bool


def test_val_preset_resizes_masks_nearest() -> None:
    t = make_transforms("val", scales=[120], max_size=200)
    _, out = t(*_sample())
    assert out["masks"].shape == (3, 120, 160)
    assert torch.equal(out["masks"][0].nonzero().min(0).values, torch.tensor([20, 10]))


# --- fuzz: any segmentation value is decoded or refused with MaskError, never a crash -------

_NUMBER = st.one_of(st.integers(-50, 80), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-2**70, 2**70), st.booleans())
SEGMENTATIONS = st.one_of(
    st.lists(st.lists(_NUMBER, max_size=10), max_size=3),
    st.fixed_dictionaries({"size": st.lists(st.integers(-2, 40), max_size=3),
                           "counts": st.one_of(st.text(max_size=12),
                                               st.lists(st.integers(-3, 1300), max_size=6),
                                               st.binary(max_size=8))}),
    st.none(), st.integers(), st.text(max_size=5),
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(segm=SEGMENTATIONS)
def test_any_segmentation_decodes_or_raises_mask_error(segm) -> None:
    try:
        mask = decode_segmentation(segm, H, W, where="f.json: annotation 1")
    except MaskError as err:
        assert str(err).startswith("f.json: annotation 1: segmentation: ")
    else:
        assert mask.shape == (H, W) and mask.dtype == np.uint8
