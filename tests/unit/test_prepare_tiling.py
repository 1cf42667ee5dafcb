"""prepare.tile: large images become overlapping tiles in the canonical dataset, their boxes
clipped, fragments under min_visible dropped, tiles of one image in one split, a map back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from detr.config import ConfigError
from detr.data.coco import load_coco
from detr.data.layout import SPLITS, TILE_OF, whole_annotation_name
from pipelines.params import DemoConfig, PrepareConfig, TileConfig
from pipelines.stages import prepare

TILE = TileConfig(size=128, overlap=0.25, min_image_side=200, min_visible=0.5)


def _read(root, name):
    return json.loads((root / "annotations" / name).read_text())


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """The demo data (300 x 260 px images) prepared with TILE."""
    root = tmp_path_factory.mktemp("tiled") / "dataset"
    cfg = PrepareConfig(demo=DemoConfig(num_train=3, num_val=2, image_size=(260, 300),
                                        max_objects=8, seed=3), tile=TILE)
    summary = prepare.run(cfg=cfg, out_dir=root)
    return root, summary


def test_each_large_image_becomes_tiles_of_its_split(tiled):
    root, summary = tiled
    assert summary["tiled"] == {"train": 3, "val": 2}
    for split in SPLITS:
        whole = {im["id"]: im for im in _read(root, whole_annotation_name(split))["images"]}
        tiles = _read(root, f"{split}.json")["images"]
        assert len(tiles) == summary["tiles"][split] == len(whole) * 3 * 3
        for tile in tiles:
            source = tile[TILE_OF]
            assert whole[source["image_id"]]["file_name"] == source["file_name"]
            # the source is of this split (ids repeat across splits in the demo data)
            with Image.open(root / "images" / split / tile["file_name"]) as pil:
                assert pil.size == (tile["width"], tile["height"]) == (128, 128)
                pixels = np.asarray(pil.convert("RGB"), dtype=np.float32)
            with Image.open(root / "images" / split / source["file_name"]) as pil:
                x0, y0 = source["x0"], source["y0"]
                crop = pil.convert("RGB").crop((x0, y0, x0 + 128, y0 + 128))
            assert np.abs(pixels - np.asarray(crop, dtype=np.float32)).mean() < 3  # JPEG
            assert (root / "images" / split / source["file_name"]).is_file()  # kept whole
        load_coco(root / "annotations" / f"{split}.json")  # a valid COCO file


def test_tile_boxes_are_clipped_source_boxes_visible_enough(tiled):
    root, _ = tiled
    for split in SPLITS:
        whole = _read(root, whole_annotation_name(split))
        coco = _read(root, f"{split}.json")
        images = {im["id"]: im for im in coco["images"]}
        sources = {}
        for ann in whole["annotations"]:
            sources.setdefault(ann["image_id"], []).append(ann)
        for ann in coco["annotations"]:
            where = images[ann["image_id"]][TILE_OF]
            x, y, w, h = ann["bbox"]
            box = [x + where["x0"], y + where["y0"], x + w + where["x0"], y + h + where["y0"]]
            assert any(_part_of(box, src, ann["category_id"])
                       for src in sources[where["image_id"]])
        for image_id, anns in sources.items():  # a box inside a tile is there, unchanged
            tiles = [im for im in coco["images"] if im[TILE_OF]["image_id"] == image_id]
            for src in anns:
                for tile in tiles:
                    if _inside(src["bbox"], tile):
                        assert _found_unchanged(coco, tile, src)


def _part_of(box, src, category_id) -> bool:
    """``box`` (xyxy) is the part of ``src`` inside a tile, with >= min_visible of its area."""
    x, y, w, h = src["bbox"]
    inside = (box[0] >= x - 1e-6 and box[1] >= y - 1e-6 and box[2] <= x + w + 1e-6
              and box[3] <= y + h + 1e-6)
    visible = (box[2] - box[0]) * (box[3] - box[1]) / (w * h)
    return src["category_id"] == category_id and inside and visible >= TILE.min_visible - 1e-9


def _inside(bbox, tile) -> bool:
    x, y, w, h = bbox
    x0, y0 = tile[TILE_OF]["x0"], tile[TILE_OF]["y0"]
    return x >= x0 and y >= y0 and x + w <= x0 + tile["width"] and y + h <= y0 + tile["height"]


def _found_unchanged(coco, tile, src) -> bool:
    x0, y0 = tile[TILE_OF]["x0"], tile[TILE_OF]["y0"]
    x, y, w, h = src["bbox"]
    return any(a["image_id"] == tile["id"] and a["category_id"] == src["category_id"]
               and a["bbox"] == pytest.approx([x - x0, y - y0, w, h])
               for a in coco["annotations"])


def test_ids_stay_unique_across_splits(tiled):
    root, _ = tiled
    image_ids = [im["id"] for s in SPLITS for im in _read(root, f"{s}.json")["images"]]
    ann_ids = [a["id"] for s in SPLITS for a in _read(root, f"{s}.json")["annotations"]]
    assert len(set(image_ids)) == len(image_ids) and len(set(ann_ids)) == len(ann_ids)


def test_fragments_below_min_visible_are_dropped(tmp_path):
    root = tmp_path / "d"
    (root / "annotations").mkdir(parents=True)
    (root / "images" / "train").mkdir(parents=True)
    Image.new("RGB", (300, 100)).save(root / "images" / "train" / "a.png")
    cats = [{"id": 1, "name": "x", "supercategory": "object"}]
    # 40 px wide at x 100..140: tiles start at 0, 86, 172 (128 px, overlap 0.25)
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 10, 40, 20], "area": 800,
             "iscrowd": 0}]
    (root / "annotations" / "train.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "a.png", "width": 300, "height": 100}],
         "annotations": anns, "categories": cats}))
    (root / "annotations" / "val.json").write_text(json.dumps(
        {"images": [], "annotations": [], "categories": cats}))
    prepare.tile_dataset(root, TileConfig(size=128, overlap=0.25, min_image_side=200,
                                          min_visible=0.8))
    coco = _read(root, "train.json")
    by_tile = {im["id"]: im[TILE_OF]["x0"] for im in coco["images"]}
    assert sorted(by_tile.values()) == [0, 86, 172]
    # tile 0 sees 28 of 40 px (0.7 < 0.8): dropped; tile 86 sees it whole; tile 172 none
    assert [(by_tile[a["image_id"]], a["bbox"]) for a in coco["annotations"]] == [
        (86, [14.0, 10.0, 40.0, 20.0])]


def test_images_not_larger_than_the_threshold_are_unchanged(tmp_path):
    root = tmp_path / "d"
    cfg = PrepareConfig(demo=DemoConfig(num_train=2, num_val=1, image_size=200, seed=1),
                        tile=TILE)  # 200 is not longer than min_image_side 200
    prepare.run(cfg=cfg, out_dir=root)
    before = root.parent / "plain"
    prepare.run(cfg=PrepareConfig(demo=cfg.demo), out_dir=before)
    for split in SPLITS:
        assert _read(root, f"{split}.json") == _read(before, f"{split}.json")
        assert not (root / "annotations" / whole_annotation_name(split)).exists()


def test_bad_tile_params_name_the_key():
    with pytest.raises(ConfigError, match="prepare.tile.min_image_side"):
        TileConfig(size=512, min_image_side=256)
    with pytest.raises(ConfigError, match="prepare.tile.overlap"):
        TileConfig(overlap=1.0)
