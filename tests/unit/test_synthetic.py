"""The synthetic demo dataset: deterministic, valid COCO, all size classes, readable."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr.data.coco import CocoDetection
from detr.data.synthetic import generate, main

ARGS = {"num_train": 9, "num_val": 6, "image_size": 160, "max_objects": 5}
# sha256 of the files of generate(seed=3, **ARGS) made by the generator before it had scene
# knobs (objects, object_sizes, background, classes; commit ab29032): their defaults must not
# change a byte of the demo. (Same pinned numpy and Pillow: JPEG bytes depend on libjpeg.)
DEMO_SHA256 = "67751e8ceb08f7b32e2e4b0c216568b14290a7fa99f896e84782c8f91eff956c"
DENSE = {"image_size": 640, "objects": (20, 40), "object_sizes": (8, 40)}  # held-out set A


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


def _sha256(root: Path) -> str:
    digest = hashlib.sha256()
    for name, data in _files(root).items():
        digest.update(name.encode())
        digest.update(data)
    return digest.hexdigest()


def test_default_knobs_leave_the_demo_byte_identical(root) -> None:
    assert _sha256(root) == DEMO_SHA256
    info = json.loads((root / "annotations" / "train.json").read_text())["info"]
    assert "generator" not in info


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


def _boxes_per_image(coco: dict) -> list[int]:
    counts = dict.fromkeys((img["id"] for img in coco["images"]), 0)
    for ann in coco["annotations"]:
        counts[ann["image_id"]] += 1
    return list(counts.values())


def test_dense_small_objects_are_all_placed(tmp_path) -> None:
    summary = generate(tmp_path, num_train=3, num_val=1, seed=0, num_workers=1, **DENSE)
    coco = json.loads((tmp_path / "annotations" / "train.json").read_text())
    assert all(20 <= n <= 40 for n in _boxes_per_image(coco))
    sides = [math.sqrt(a["area"]) for a in coco["annotations"]]
    assert 8 <= min(sides) and max(sides) <= 40
    train = summary["splits"]["train"]
    assert train["skipped"] == 0 and train["annotations"] == len(sides)
    assert 20 <= train["objects_per_image"][0] <= train["objects_per_image"][1] <= 40
    assert coco["info"]["generator"] == {"objects": [20, 40], "object_sizes": [8.0, 40.0],
                                         "background": "clutter", "classes": 6}


def test_texture_background_and_fewer_classes(tmp_path) -> None:
    knobs = {"num_train": 4, "num_val": 2, "seed": 1, "num_workers": 1, "objects": (1, 8),
             "object_sizes": (10, 140), "classes": 5}
    generate(tmp_path / "t", background="texture", **knobs)
    generate(tmp_path / "c", background="clutter", **knobs)
    textured = json.loads((tmp_path / "t" / "annotations" / "train.json").read_text())
    assert [c["name"] for c in textured["categories"]] == [
        "circle", "square", "triangle", "star", "cross"]
    assert {a["category_id"] for a in textured["annotations"]} <= {1, 2, 3, 4, 5}
    assert textured["info"]["generator"]["background"] == "texture"
    image = (tmp_path / "t" / "images" / "train" / "000000.jpg").read_bytes()
    assert image != (tmp_path / "c" / "images" / "train" / "000000.jpg").read_bytes()


@pytest.mark.parametrize(("knobs", "named"), [
    ({"objects": (0, 3)}, "objects per image"),
    ({"objects": (2, 3), "max_objects": 3}, "not both"),
    ({"object_sizes": (2, 30)}, "object_sizes"),
    ({"object_sizes": (10, 200)}, "object_sizes"),  # above 0.8 x 160 px
    ({"background": "plain"}, "background"),
    ({"classes": 7}, "classes"),
])
def test_bad_knobs_are_named(tmp_path, knobs, named) -> None:
    with pytest.raises(ValueError, match=named):
        generate(tmp_path, num_train=1, num_val=1, image_size=160, **knobs)


def test_cli_passes_the_knobs(tmp_path, capsys) -> None:
    main(["--root", str(tmp_path), "--num-train", "2", "--num-val", "1", "--image-size", "96",
          "--objects", "2,3", "--object-sizes", "10,30", "--background", "texture",
          "--classes", "2", "--workers", "1"])
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["splits"]["train"]["per_category"]) == {"circle", "square"}
    coco = json.loads((tmp_path / "annotations" / "train.json").read_text())
    assert all(2 <= n <= 3 for n in _boxes_per_image(coco))
