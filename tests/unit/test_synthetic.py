"""The synthetic demo dataset: deterministic, valid COCO, all size classes, readable."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr.data.coco import CocoDetection
from detr.data.synthetic import generate

ARGS = {"num_train": 9, "num_val": 6, "image_size": 160, "max_objects": 5}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synthetic")
    generate(path, seed=3, num_workers=1, **ARGS)
    return path


def _coco(root: Path, split: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(root / "annotations" / f"{split}.json"))


def test_same_seed_gives_identical_bytes_whatever_the_workers(root, tmp_path) -> None:
    again = generate(tmp_path / "again", seed=3, num_workers=2, **ARGS)
    assert _files(root) == _files(tmp_path / "again")
    assert again["splits"]["train"]["images"] == 9 and again["splits"]["val"]["images"] == 6


def test_different_seeds_differ(root, tmp_path) -> None:
    generate(tmp_path / "other", seed=4, num_workers=1, **ARGS)
    mine, other = _files(root), _files(tmp_path / "other")
    assert mine.keys() == other.keys()
    assert mine["annotations/train.json"] != other["annotations/train.json"]
    assert mine["images/train/000000.jpg"] != other["images/train/000000.jpg"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_all_coco_size_classes_and_categories_present(root, split) -> None:
    coco = _coco(root, split)
    areas = [a["bbox"][2] * a["bbox"][3] for a in coco.dataset["annotations"]]
    assert min(areas) < 32**2 and any(32**2 <= a < 96**2 for a in areas) and max(areas) >= 96**2
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] for a in coco.dataset["annotations"])
    ids = sorted(coco.cats)
    assert len(ids) >= 5 and ids != list(range(len(ids)))  # not the contiguous labels


@pytest.mark.parametrize("split", ["train", "val"])
def test_json_is_valid_coco(root, split) -> None:
    coco = _coco(root, split)
    assert len(coco.imgs) == ARGS[f"num_{split}"]
    for img in coco.dataset["images"]:
        with Image.open(root / "images" / split / img["file_name"]) as pil:
            assert pil.size == (img["width"], img["height"]) and pil.mode == "RGB"
        anns = coco.imgToAnns[img["id"]]
        assert 1 <= len(anns) <= ARGS["max_objects"]
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] and y + h <= img["height"]
            assert ann["iscrowd"] == 0 and ann["category_id"] in coco.cats
    # the ground truth scored as detections is a perfect result for COCOeval
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0} for a in coco.dataset["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(dets), iouType="bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_dataset_class_reads_it(root) -> None:
    data = CocoDetection.from_root(root, "val")
    image, target = data[0]
    assert image.shape == (3, 160, 160) and len(target["boxes"]) >= 1
    assert 0 <= int(target["labels"].min()) and int(target["labels"].max()) < data.num_classes


def test_summary_counts_match_the_json(root, tmp_path) -> None:
    summary = generate(tmp_path / "s", seed=3, num_workers=1, **ARGS)
    train = json.loads((root / "annotations" / "train.json").read_text())
    assert summary["splits"]["train"]["annotations"] == len(train["annotations"])
    assert sum(summary["splits"]["train"]["area_ranges"].values()) == len(train["annotations"])
    assert sum(summary["splits"]["train"]["per_category"].values()) == len(train["annotations"])


def test_existing_dataset_needs_overwrite(root, tmp_path) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(root, seed=3, num_workers=1, **ARGS)
    target = tmp_path / "o"
    generate(target, seed=1, num_workers=1, **{**ARGS, "num_train": 4})
    generate(target, seed=1, num_workers=1, overwrite=True, **{**ARGS, "num_train": 2})
    assert len(list((target / "images" / "train").iterdir())) == 2


def test_bad_arguments_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path / "a", image_size=32)
    with pytest.raises(ValueError, match="seed"):
        generate(tmp_path / "b", seed=-1)


def test_rectangular_images(tmp_path) -> None:
    generate(tmp_path, num_train=2, num_val=1, image_size=(96, 128), seed=0, num_workers=1)
    coco = json.loads((tmp_path / "annotations" / "val.json").read_text())
    assert (coco["images"][0]["height"], coco["images"][0]["width"]) == (96, 128)
    with Image.open(tmp_path / "images" / "val" / coco["images"][0]["file_name"]) as pil:
        assert pil.size == (128, 96)
