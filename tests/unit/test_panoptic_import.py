"""Masks through the importers: COCO panoptic (PNG segment maps) -> one RLE annotation per
segment; COCO keeps segmentation and isthing; YOLO segmentation polygons -> COCO polygons; the
COCO panoptic release layout is recognised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr.data.coco import CocoDetection
from detr.data.detect_layout import detect_layout, import_layout
from detr.data.formats import FormatError, import_coco
from detr.data.masks import decode_segmentation, mask_bbox
from detr.data.panoptic import import_coco_panoptic
from detr.data.yolo import import_yolo

H, W = 24, 32
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "human", "isthing": 1},
              {"id": 7, "name": "sky", "supercategory": "stuff", "isthing": 0, "color": [1, 2, 3]}]
# segment id -> (category, rows, cols); ids exercise R, G and B
SEGMENTS = {5: (1, slice(2, 10), slice(3, 9)), 300: (1, slice(12, 20), slice(20, 30)),
            70000: (7, slice(0, 2), slice(0, W))}


def _png(path: Path, ids: np.ndarray) -> None:
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _id_map(segments: dict = SEGMENTS) -> np.ndarray:
    ids = np.zeros((H, W), np.int64)
    for seg_id, (_, rows, cols) in segments.items():
        ids[rows, cols] = seg_id
    return ids


def write_panoptic_split(root: Path, name: str, first_id: int, count: int) -> dict:
    """``annotations/panoptic_<name>.json`` + its PNG folder + ``<name>/`` images."""
    images, anns = [], []
    for image_id in range(first_id, first_id + count):
        stem = f"{image_id:06d}"
        Image.new("RGB", (W, H), (image_id, 0, 0)).save(_mkdir(root / name) / f"{stem}.jpg")
        _png(root / "annotations" / f"panoptic_{name}" / f"{stem}.png", _id_map())
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": W, "height": H})
        infos = [{"id": s, "category_id": c, "iscrowd": int(s == 300), "bbox": [0, 0, 1, 1],
                  "area": 1} for s, (c, _, _) in SEGMENTS.items()]
        anns.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": infos})
    data = {"images": images, "annotations": anns, "categories": CATEGORIES}
    (root / "annotations" / f"panoptic_{name}.json").write_text(json.dumps(data))
    return data


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_panoptic_release(root: Path) -> Path:
    write_panoptic_split(root, "train2017", 1, 3)
    write_panoptic_split(root, "val2017", 10, 2)
    return root


def _sources(root: Path) -> dict:
    return {s: (root / f"annotations/panoptic_{s}2017.json", root / f"annotations/panoptic_{s}2017",
                root / f"{s}2017") for s in ("train", "val")}


def test_panoptic_segments_become_rle_annotations(tmp_path: Path) -> None:
    root = write_panoptic_release(tmp_path / "src")
    result = import_coco_panoptic(tmp_path / "out", _sources(root))
    assert dict(result.images) == {"train": 3, "val": 2}
    assert dict(result.annotations) == {"train": 9, "val": 6}
    data = json.loads((tmp_path / "out/annotations/train.json").read_text())
    assert data["categories"] == [{k: v for k, v in c.items() if k != "color"} for c in CATEGORIES]
    assert len({a["id"] for a in data["annotations"]}) == 9
    expected = _id_map()
    for ann in data["annotations"][:3]:
        assert isinstance(ann["segmentation"]["counts"], str)
        mask = decode_segmentation(ann["segmentation"], H, W)
        seg_id = int(expected[mask.astype(bool)][0])
        assert np.array_equal(mask, (expected == seg_id).astype(np.uint8))
        assert ann["bbox"] == mask_bbox(mask) and ann["area"] == int(mask.sum())
        assert ann["iscrowd"] == int(seg_id == 300)
        assert ann["category_id"] == SEGMENTS[seg_id][0]
    masks = CocoDetection.from_root(tmp_path / "out", "val", masks=True)[0][1]["masks"]
    assert masks.shape == (2, H, W)  # the crowd segment is not a training target


def _break(root: Path, change) -> None:
    path = root / "annotations/panoptic_train2017.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


BAD = {
    "segment not in the png": (
        lambda r: _break(r, lambda d: d["annotations"][0]["segments_info"][0].update(id=6)),
        r"image id 1 \(000001.png\): segment ids in the PNG \[5\] are not in segments_info"),
    "listed segment has no pixels": (
        lambda r: _break(r, lambda d: d["annotations"][0]["segments_info"].append(
            {"id": 9, "category_id": 1})), r"image id 1 .*segment 9 of segments_info has no "),
    "unknown category": (
        lambda r: _break(r, lambda d: d["annotations"][1]["segments_info"][0].update(
            category_id=3)), r"image id 2 .*segment 5: category_id 3 is not in categories"),
    "png of another size": (
        lambda r: _png(r / "annotations/panoptic_train2017/000003.png", np.zeros((5, 5))),
        r"image id 3 \(000003.png\): the PNG is 5x5 \(WxH\), the image 32x24"),
    "png missing": (
        lambda r: (r / "annotations/panoptic_train2017/000002.png").unlink(),
        r"000002.png: cannot read the panoptic PNG"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_panoptic_defects_name_the_json_image_and_segment(tmp_path: Path, case: str) -> None:
    root = write_panoptic_release(tmp_path / "src")
    breaker, message = BAD[case]
    breaker(root)
    with pytest.raises(FormatError, match=message):
        import_coco_panoptic(tmp_path / "out", _sources(root))


def test_panoptic_release_is_recognised_and_imported(tmp_path: Path) -> None:
    root = write_panoptic_release(tmp_path / "src")
    layout = detect_layout(root)
    assert (layout.format, layout.name) == ("coco_panoptic", "the COCO panoptic release layout")
    assert ("train: annotations/panoptic_train2017.json + train2017/ + "
            "annotations/panoptic_train2017/") in layout.describe()
    result = import_layout(layout, tmp_path / "out")
    assert dict(result.annotations) == {"train": 9, "val": 6}


def test_instances_and_panoptic_in_one_folder_need_a_format(tmp_path: Path) -> None:
    root = write_panoptic_release(tmp_path / "src")
    for name in ("train2017", "val2017"):
        data = json.loads((root / f"annotations/panoptic_{name}.json").read_text())
        instances = {"images": data["images"], "annotations": [], "categories": CATEGORIES}
        (root / f"annotations/instances_{name}.json").write_text(json.dumps(instances))
    with pytest.raises(FormatError, match=r"Set prepare.format \(coco, coco_panoptic\)"):
        detect_layout(root)
    assert detect_layout(root, format="coco_panoptic").format == "coco_panoptic"
    assert detect_layout(root, format="coco").name == "the COCO release layout"


def test_panoptic_json_without_its_png_folder(tmp_path: Path) -> None:
    root = write_panoptic_release(tmp_path / "src")
    for png in (root / "annotations/panoptic_val2017").iterdir():
        png.unlink()
    (root / "annotations/panoptic_val2017").rmdir()
    with pytest.raises(FormatError, match=r"panoptic_val2017.json: found, but not its PNG"):
        detect_layout(root)


def test_coco_import_keeps_segmentation_and_isthing(tmp_path: Path) -> None:
    Image.new("RGB", (W, H)).save(_mkdir(tmp_path / "img") / "a.png")
    polygon = [[1, 1, 9, 1, 9, 7]]
    rle = {"size": [H, W], "counts": "0`0"}
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 6], "area": 30,
             "iscrowd": 0, "segmentation": polygon},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 2, 2], "iscrowd": 0,
             "segmentation": rle},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [3, 3, 2, 2], "iscrowd": 0,
             "segmentation": []}]  # box-only exports write an empty list: dropped
    data = {"images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
            "annotations": anns, "categories": CATEGORIES}
    (tmp_path / "all.json").write_text(json.dumps(data))
    import_coco(tmp_path / "out", {"all": (tmp_path / "all.json", tmp_path / "img")},
                val_fraction=0.0)
    out = json.loads((tmp_path / "out/annotations/train.json").read_text())
    assert [a.get("segmentation") for a in out["annotations"]] == [polygon, rle, None]
    assert [c.get("isthing") for c in out["categories"]] == [1, 0]
    anns[0]["segmentation"] = [[1, 1, 9, 1]]  # malformed: copied, for validate to name
    (tmp_path / "all.json").write_text(json.dumps(data))
    import_coco(tmp_path / "out2", {"all": (tmp_path / "all.json", tmp_path / "img")},
                val_fraction=0.0)
    out = json.loads((tmp_path / "out2/annotations/train.json").read_text())
    assert out["annotations"][0]["segmentation"] == [[1, 1, 9, 1]]


def test_yolo_segmentation_polygons(tmp_path: Path) -> None:
    Image.new("RGB", (W, H)).save(_mkdir(tmp_path / "yolo/images") / "a.png")
    Image.new("RGB", (W, H)).save(tmp_path / "yolo/images/b.png")
    (tmp_path / "yolo/classes.txt").write_text("cat\ndog\n")
    lines = ["1 0.25 0.25 0.75 0.25 0.75 0.75 0.25 0.75", "0 0.5 0.5 0.25 0.5"]
    _mkdir(tmp_path / "yolo/labels").joinpath("a.txt").write_text("\n".join(lines) + "\n")
    import_yolo(tmp_path / "out", tmp_path / "yolo", val_fraction=0.5, seed=0)
    anns = {s: json.loads((tmp_path / f"out/annotations/{s}.json").read_text())["annotations"]
            for s in ("train", "val")}
    polygon, box = sorted(anns["train"] or anns["val"], key=lambda a: a["category_id"],
                          reverse=True)
    assert polygon["segmentation"] == [[8.0, 6.0, 24.0, 6.0, 24.0, 18.0, 8.0, 18.0]]
    assert polygon["bbox"] == [8.0, 6.0, 16.0, 12.0]
    mask = decode_segmentation(polygon["segmentation"], H, W)
    assert polygon["area"] == int(mask.sum()) and mask_bbox(mask) == polygon["bbox"]
    assert "segmentation" not in box and box["bbox"] == [12.0, 6.0, 8.0, 12.0]


@pytest.mark.parametrize("line", ["0 0.1 0.1 0.2 0.2 0.3", "0 0.1 0.1 0.2 0.2 0.3 0.3 0.4"])
def test_yolo_polygon_of_bad_length(tmp_path: Path, line: str) -> None:
    Image.new("RGB", (W, H)).save(_mkdir(tmp_path / "yolo/images") / "a.png")
    (tmp_path / "yolo/classes.txt").write_text("cat\n")
    _mkdir(tmp_path / "yolo/labels").joinpath("a.txt").write_text(line + "\n")
    with pytest.raises(FormatError, match=r"a.txt:1: expected 5 fields .* or a polygon"):
        import_yolo(tmp_path / "out", tmp_path / "yolo")
