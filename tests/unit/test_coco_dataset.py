"""CocoDetection: contract types, label mapping, dropped boxes, colour modes, load errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from detr.data.coco import (
    AnnotationError,
    CocoDetection,
    ImageLoadError,
    category_ids_from_label_map,
)

CATEGORIES = [{"id": 42, "name": "fox"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


def _ann(ann_id: int, image_id: int, cat: int, bbox: list[float], crowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox,
            "area": bbox[2] * bbox[-1], "iscrowd": crowd}


def _write(root: Path, images: dict[str, Image.Image], anns: list[dict], sizes=None) -> Path:
    """Save ``images`` under root/images/train and a json; image ids are 1.. in dict order."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    entries = []
    for image_id, (name, pil) in enumerate(images.items(), start=1):
        pil.save(root / "images" / "train" / name)
        w, h = (sizes or {}).get(name, pil.size)
        entries.append({"id": image_id, "file_name": name, "width": w, "height": h})
    coco = {"images": entries, "annotations": anns, "categories": CATEGORIES}
    (root / "annotations" / "train.json").write_text(json.dumps(coco))
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> CocoDetection:
    images = {"a.png": Image.new("RGB", (64, 48), (10, 20, 30)),
              "b.png": Image.new("L", (40, 30), 100),
              "c.png": Image.new("RGBA", (20, 20), (200, 50, 25, 0)),
              "d.png": Image.new("P", (20, 20), 0),
              "e.jpg": Image.new("CMYK", (20, 20), (0, 0, 0, 0))}
    anns = [
        _ann(1, 1, 3, [10, 5, 20, 10]),        # kept: label of cat (id 3) is 0
        _ann(2, 1, 42, [50, 40, 30, 30]),      # kept, clamped to x2=64, y2=48
        _ann(3, 1, 7, [1, 1, 30, 30], crowd=1),  # crowd: dropped
        _ann(4, 1, 7, [5, 5, 0, 10]),          # zero width: dropped
        _ann(5, 1, 7, [70, 10, 5, 5]),         # outside the image, degenerate once clamped
        _ann(6, 2, 7, [0, 0, 40, 30]),
    ]
    return CocoDetection.from_root(_write(tmp_path, images, anns), "train")


def test_item_follows_the_contract(dataset: CocoDetection) -> None:
    image, target = dataset[0]
    assert isinstance(image, tv_tensors.Image)
    assert image.dtype == torch.uint8 and image.shape == (3, 48, 64)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes)
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert tuple(boxes.canvas_size) == (48, 64) and boxes.dtype == torch.float32
    assert target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and isinstance(target["image_id"], int)
    assert target["orig_size"].dtype == torch.int64
    assert target["orig_size"].tolist() == [48, 64]


def test_crowd_and_degenerate_boxes_are_dropped_and_boxes_clamped(dataset) -> None:
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [50, 40, 64, 48]]
    assert target["labels"].tolist() == [0, 2]


def test_label_mapping_round_trips_non_contiguous_ids(dataset, tmp_path) -> None:
    assert dataset.label_to_category == [3, 7, 42]
    assert dataset.category_to_label == {3: 0, 7: 1, 42: 2}
    assert [c["name"] for c in dataset.categories] == ["cat", "dog", "fox"]
    assert dataset.num_classes == 3
    _, target = dataset[0]
    assert [dataset.label_to_category[int(i)] for i in target["labels"]] == [3, 42]
    torch.save({"label_map": dataset.label_map()}, tmp_path / "ckpt.pth")
    loaded = torch.load(tmp_path / "ckpt.pth", weights_only=True)["label_map"]
    assert json.loads(json.dumps(loaded)) == loaded
    assert category_ids_from_label_map(loaded) == [3, 7, 42]


def test_bad_label_map_is_named() -> None:
    with pytest.raises(ValueError, match="label map"):
        category_ids_from_label_map({"classes": [1, 2]})


@pytest.mark.parametrize("index,value", [(1, (100, 100, 100)), (2, (200, 50, 25)),
                                         (3, (0, 0, 0)), (4, (255, 255, 255))])
def test_non_rgb_images_become_rgb(dataset, index: int, value: tuple) -> None:
    image, _ = dataset[index]
    assert image.shape[0] == 3 and image.dtype == torch.uint8
    # JPEG (the CMYK file) may be off by a few levels
    assert (image[:, 0, 0].int() - torch.tensor(value)).abs().max() <= 3


def test_missing_image_error_names_path_and_id(tmp_path: Path) -> None:
    root = _write(tmp_path, {"gone.png": Image.new("RGB", (8, 8))}, [])
    (root / "images" / "train" / "gone.png").unlink()
    data = CocoDetection.from_root(root, "train")
    with pytest.raises(ImageLoadError, match=r"image id 1: .*gone\.png") as info:
        data[0]
    assert isinstance(info.value, OSError)


def test_unreadable_image_error_names_path(tmp_path: Path) -> None:
    root = _write(tmp_path, {"bad.jpg": Image.new("RGB", (8, 8))}, [])
    (root / "images" / "train" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageLoadError, match=r"bad\.jpg"):
        CocoDetection.from_root(root, "train")[0]


def test_size_mismatch_is_an_error(tmp_path: Path) -> None:
    root = _write(tmp_path, {"x.png": Image.new("RGB", (8, 6))}, [], sizes={"x.png": (6, 8)})
    with pytest.raises(ImageLoadError, match=r"x\.png is 8x6"):
        CocoDetection.from_root(root, "train")[0]


def test_unknown_category_is_named(tmp_path: Path) -> None:
    root = _write(tmp_path, {"x.png": Image.new("RGB", (8, 8))}, [_ann(9, 1, 5, [0, 0, 4, 4])])
    with pytest.raises(AnnotationError, match="annotation 9 .* category_id 5"):
        CocoDetection.from_root(root, "train")[0]


def test_image_without_annotations_has_empty_targets(tmp_path: Path) -> None:
    root = _write(tmp_path, {"x.png": Image.new("RGB", (8, 8))}, [])
    _, target = CocoDetection.from_root(root, "train")[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_missing_annotation_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        CocoDetection(tmp_path, tmp_path / "nowhere.json")


def test_transforms_receive_image_and_target(dataset: CocoDetection) -> None:
    dataset.transforms = lambda image, target: (image.shape, sorted(target))
    assert dataset[0] == ((3, 48, 64), ["boxes", "image_id", "labels", "orig_size"])


def test_malformed_bbox_is_named(tmp_path: Path) -> None:
    root = _write(tmp_path, {"x.png": Image.new("RGB", (8, 8))}, [_ann(4, 1, 3, [0, 0, 4])])
    with pytest.raises(AnnotationError, match=r"annotation 4 of image 1 \(annotations\[0\]\): bbox"):
        CocoDetection.from_root(root, "train")[0]
