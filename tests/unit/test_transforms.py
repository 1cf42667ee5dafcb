"""Transform presets keep boxes on their objects; collate pads with a mask."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from detr.data.batching import collate
from detr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomSizeCrop,
    make_transforms,
    paper_defaults,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _sample(height: int, width: int, boxes: list[list[float]]) -> tuple:
    """A black image with a white rectangle painted exactly under each XYXY box."""
    image = torch.zeros((3, height, width), dtype=torch.uint8)
    for x0, y0, x1, y1 in boxes:
        image[:, int(y0):int(y1), int(x0):int(x1)] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes).reshape(-1, 4), format="XYXY",
                                          canvas_size=(height, width)),
        "labels": torch.arange(len(boxes), dtype=torch.int64),
        "image_id": 7,
        "orig_size": torch.tensor([height, width]),
    }
    return tv_tensors.Image(image), target


def _pixel_boxes(image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Normalised cxcywh -> absolute xyxy on ``image`` (test-side reference maths)."""
    h, w = image.shape[-2:]
    cx, cy, bw, bh = (boxes * torch.tensor([w, h, w, h])).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def test_hflip_mirrors_the_normalised_box() -> None:
    t = make_transforms("train", scales=[80], max_size=200, crop_scales=None, hflip=True)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = t(*_sample(80, 100, [[10, 20, 50, 60]]))
        assert image.shape == (3, 80, 100)  # the only scale is the image's own
        seen.add(tuple(round(v, 4) for v in target["boxes"][0].tolist()))
    assert seen == {(0.3, 0.5, 0.4, 0.5), (0.7, 0.5, 0.4, 0.5)}


@pytest.mark.parametrize("seed", range(12))
def test_train_preset_keeps_boxes_on_their_objects(seed: int) -> None:
    torch.manual_seed(seed)
    t = make_transforms("train", scales=[64, 80, 96], max_size=160, crop_scales=[60, 70],
                        crop_size=(40, 60))
    image, target = t(*_sample(90, 120, [[10, 10, 50, 40], [70, 50, 110, 85]]))
    assert target["boxes"].shape[0] == target["labels"].shape[0] >= 1
    assert target["boxes"].min() >= 0 and target["boxes"].max() <= 1
    white = (image * STD + MEAN).mean(0) > 0.5
    inside = torch.zeros_like(white)
    m = 3  # resizing up to 2.4x blurs edges by a pixel or two
    for x0, y0, x1, y1 in _pixel_boxes(image, target["boxes"]).round().int().tolist():
        inside[max(y0 - m, 0):y1 + m, max(x0 - m, 0):x1 + m] = True
        core = white[y0 + m:y1 - m, x0 + m:x1 - m]
        assert core.numel() == 0 or core.float().mean() > 0.98  # slivers left by a crop
    assert white[~inside].float().mean() < 0.02  # no white pixels left outside the boxes


def test_train_sizes_come_from_the_scales() -> None:
    scales = [64, 80, 96]
    t = make_transforms("train", scales=scales, max_size=400, crop_scales=[70], crop_size=(40, 60))
    short_sides = set()
    for seed in range(40):
        torch.manual_seed(seed)
        image, target = t(*_sample(90, 120, [[10, 10, 50, 40]]))
        assert target["size"].tolist() == list(image.shape[-2:])
        short_sides.add(min(image.shape[-2:]))
    # v2.RandomShortestSize truncates (int(side * ratio)): allow one pixel below a scale
    assert all(any(0 <= s - side <= 1 for s in scales) for side in short_sides), short_sides
    assert len(short_sides) > 1


def test_val_resizes_short_side_to_largest_scale_with_max_size() -> None:
    t = make_transforms("val", scales=[64, 80], max_size=1000)
    image, target = t(*_sample(100, 200, [[0, 0, 200, 100], [20, 10, 60, 30]]))
    assert image.shape == (3, 80, 160) and image.dtype == torch.float32
    assert target["size"].tolist() == [80, 160] and target["size"].dtype == torch.int64
    expected = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.2, 0.2, 0.2, 0.2]])
    torch.testing.assert_close(target["boxes"], expected)
    assert type(image) is torch.Tensor and type(target["boxes"]) is torch.Tensor
    assert target["image_id"] == 7 and target["orig_size"].tolist() == [100, 200]
    capped = make_transforms("val", scales=[80], max_size=200)(*_sample(100, 400, []))[0]
    assert capped.shape == (3, 50, 200)


def test_val_normalises_with_imagenet_statistics() -> None:
    image, _ = make_transforms("val", scales=[8], max_size=8)(*_sample(8, 8, [[0, 0, 8, 8]]))
    torch.testing.assert_close(image[:, 0, 0], (1 - MEAN.flatten()) / STD.flatten())


def test_degenerate_boxes_are_dropped_with_their_labels() -> None:
    image, target = _sample(50, 50, [[5, 5, 20, 20], [30, 30, 30, 40], [10, 10, 40, 10.5]])
    _, out = make_transforms("val", scales=[50], max_size=100)(image, target)
    assert out["labels"].tolist() == [0] and out["boxes"].shape == (1, 4)


def test_images_without_boxes_pass_through() -> None:
    t = make_transforms("train", scales=[32, 40], max_size=80, crop_scales=[30], crop_size=(20, 30))
    for seed in range(6):
        torch.manual_seed(seed)
        _, target = t(*_sample(40, 50, []))
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_random_size_crop_stays_within_bounds() -> None:
    crop = RandomSizeCrop(20, 30)
    for seed in range(10):
        torch.manual_seed(seed)
        image = crop(tv_tensors.Image(torch.zeros(3, 25, 100)))
        assert 20 <= image.shape[1] <= 25 and 20 <= image.shape[2] <= 30
    assert crop(tv_tensors.Image(torch.zeros(3, 10, 12))).shape == (3, 10, 12)  # smaller: kept


@pytest.mark.parametrize("kwargs,match", [
    ({"preset": "test", "scales": [32], "max_size": 64}, "unknown preset"),
    ({"preset": "val", "scales": [], "max_size": 64}, "scales"),
    ({"preset": "val", "scales": [96], "max_size": 64}, "max_size 64"),
    ({"preset": "train", "scales": [32], "max_size": 64, "crop_size": (50, 40)}, "crop_size"),
])
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_transforms(**kwargs)


def test_paper_defaults_build_both_presets() -> None:
    defaults = paper_defaults()
    assert defaults["scales"][0] == 480 and defaults["scales"][-1] == 800
    assert len(defaults["scales"]) == 11 and defaults["max_size"] == 1333
    for preset in ("train", "val"):
        assert isinstance(make_transforms(preset, **defaults), v2.Compose)


def test_collate_pads_and_masks() -> None:
    t = make_transforms("val", scales=[40], max_size=100)
    batch = [t(*_sample(40, 60, [[0, 0, 10, 10]])), t(*_sample(80, 40, [[5, 5, 15, 25]]))]
    images, mask, targets = collate(batch)
    assert images.shape == (2, 3, 80, 60) and mask.shape == (2, 80, 60)
    assert mask.dtype == torch.bool
    assert not mask[0, :40, :].any() and mask[0, 40:, :].all()
    assert not mask[1, :, :40].any() and mask[1, :, 40:].all()
    torch.testing.assert_close(images[0, :, :40, :], batch[0][0])
    assert (images[0, :, 40:] == 0).all()
    assert targets[1] is batch[1][1]


def test_collate_rejects_bad_batches() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match="item 1"):
        collate([(torch.zeros(3, 4, 4), {}), torch.zeros(3, 4, 4)])
