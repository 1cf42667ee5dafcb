"""The ``prepare`` stage: the built-in demo data or the user's data -> the canonical layout.

Writes ``data/dataset/annotations/{train,val}.json`` and ``data/dataset/images/{train,val}/``.
Images of an imported dataset are linked, not copied (``prepare.link``; default ``hardlink``:
with the project's DVC ``cache.type: hardlink,symlink`` the source, the DVC cache and
``data/dataset`` then share one copy of each image, README "Disk and scale"). A user's source
is recognised by :func:`detr.data.detect_layout.detect_layout`
(``prepare.format: auto``) or read as the format named; the layout found is printed.

With ``prepare.tile`` set, each image with a side longer than ``tile.min_image_side`` is then
cut into overlapping tiles (:func:`tile_dataset`), after the train/val split, so that the
tiles of one image stay in its split: ``annotations/<split>.json`` lists the tiles (each image
record with ``tile_of``: ``{"image_id", "file_name", "x0", "y0"}`` of its source) and the
images left whole, ``annotations/<split>_whole.json`` the source images as they were (their
files stay in ``images/<split>/``; the evaluate stage's tiled prediction reads them). Tiles
are written to ``images/<split>/tiles/<source stem>_<x0>_<y0><suffix>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path, PurePosixPath

import torch
from PIL import Image
from prefect import flow

from detr.auto_tiles import TILE_MIN_VISIBLE, TILE_OVERLAP, tile_rule
from detr.data import formats, synthetic
from detr.data.detect_layout import detect_layout, import_layout
from detr.data.layout import SPLITS, TILE_OF, TILES_FOLDER, whole_annotation_name
from detr.data.profile import DatasetProfile
from detr.data.tiling import Tile, crop_boxes, tile_grid
from detr.device import device_type
from pipelines import stage
from pipelines.params import PrepareConfig, TileConfig
from pipelines.stage import DATASET

TILING = "tiling.json"  # prepare.tile: auto's decision, in the dataset's annotations/
TILE_SUFFIXES = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}  # others become .png


def run(*, cfg: PrepareConfig, out_dir: Path = DATASET, last_stage: str = "layer4",
        dilation: bool = False, feature_levels: int = 1, device: str = "cpu",
        task: str = "detection") -> dict:
    """Create ``out_dir`` from ``cfg.source``; returns ``{"images": {split: n},
    "annotations": {split: n}}``. ``last_stage``, ``dilation``, ``feature_levels`` (the
    model's, which set the finest stride) and ``device``
    (``cpu`` / ``cuda``): what ``prepare.tile: auto`` decides by; the decision is written to
    ``annotations/tiling.json`` (``size``: the tile side or null, ``why``). ``task`` (the
    model's): the demo gets masks for segmentation, and ``prepare.demo.stuff`` stuff classes
    for panoptic; tiles keep no masks, so segmentation is not tiled.

    Raises:
        ValueError: an explicit ``prepare.tile`` with ``model.task`` segmentation/panoptic.
    """
    masks = task != "detection"
    if masks and cfg.tile not in (None, "auto"):  # before anything is removed
        raise ValueError(f"prepare.tile: tiles keep boxes only, and model.task: {task} needs "
                         "masks; set prepare.tile: null (or auto, which does not tile them)")
    summary = _prepare(cfg, out_dir, masks=masks, stuff=cfg.demo.stuff if task == "panoptic"
                       else 0)
    tile = cfg.tile
    if tile == "auto" and masks:
        print(f"prepare: tile auto: no tiles for model.task: {task} (tiles keep boxes only)")
        tile = None
    if tile == "auto":
        tile = _auto_tile(out_dir, last_stage=last_stage, dilation=dilation,
                          feature_levels=feature_levels, device=device)
    if tile is not None:
        summary = tile_dataset(out_dir, tile)
        print(f"prepare: tiled {sum(summary['tiled'].values())} images into "
              f"{sum(summary['tiles'].values())} tiles of {tile.size} px (prepare.tile)")
    counts = ", ".join(f"{split} {n} images / {summary['annotations'][split]} boxes"
                       for split, n in summary["images"].items())
    print(f"prepare: {cfg.source} -> {out_dir}: {counts}")
    return summary


def _prepare(cfg: PrepareConfig, out_dir: Path, *, masks: bool = False, stuff: int = 0) -> dict:
    layout = None
    if cfg.source != "demo":  # before removing out_dir: an unusable source changes nothing
        layout = detect_layout(cfg.source, format=cfg.format, image_dir=cfg.image_dir)
        print(f"prepare: found {layout.describe()}")
        for note in layout.notes:
            print(f"prepare: note: {note}")
    if out_dir.exists():  # DVC removes outputs first; a manual run replaces them too
        shutil.rmtree(out_dir)
    if layout is None:
        d = cfg.demo
        made = synthetic.generate(out_dir, num_train=d.num_train, num_val=d.num_val,
                                  image_size=d.image_size, max_objects=d.max_objects,
                                  masks=masks, stuff=stuff, seed=d.seed,
                                  num_workers=2)["splits"]
        return {key: {split: made[split][key] for split in made}
                for key in ("images", "annotations")}
    imported = import_layout(layout, out_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                             link=cfg.link)
    return {"images": dict(imported.images), "annotations": dict(imported.annotations)}


def _auto_tile(root: Path, **rule) -> TileConfig | None:
    """``prepare.tile: auto`` for the dataset at ``root`` (its train split), recorded in
    ``annotations/tiling.json`` and printed."""
    profile = DatasetProfile.from_file(root / "annotations" / "train.json")
    size, why = tile_rule(profile, **rule)
    (root / "annotations" / TILING).write_text(json.dumps(
        {"size": size, "overlap": TILE_OVERLAP, "min_visible": TILE_MIN_VISIBLE, "why": why},
        indent=2) + "\n")
    print(f"prepare: tile auto: {why}")
    if size is None:
        return None
    return TileConfig(size=size, overlap=TILE_OVERLAP, min_image_side=size,
                      min_visible=TILE_MIN_VISIBLE)


def tile_dataset(root: Path, cfg: TileConfig) -> dict:
    """Cut the large images of the canonical dataset at ``root`` into tiles, in place (module
    doc). Returns ``{"images": {split: n}, "annotations": {split: n}, "tiled": {split: n
    source images}, "tiles": {split: n tiles}}``. New image and annotation ids follow the
    largest of either split. Raises ValueError naming an image whose file is not the size its
    record says."""
    cocos = {s: json.loads((root / "annotations" / f"{s}.json").read_text()) for s in SPLITS}
    ids = _Ids(cocos)
    summary: dict = {"images": {}, "annotations": {}, "tiled": {}, "tiles": {}}
    for split, coco in cocos.items():
        large = {im["id"] for im in coco["images"]
                 if max(im["width"], im["height"]) > cfg.min_image_side}
        if large:
            (root / "annotations" / whole_annotation_name(split)).write_text(json.dumps(coco))
            coco = _tiled_split(root / "images" / split, coco, large, cfg, ids)
            (root / "annotations" / f"{split}.json").write_text(json.dumps(coco))
        summary["images"][split] = len(coco["images"])
        summary["annotations"][split] = len(coco["annotations"])
        summary["tiled"][split] = len(large)
        summary["tiles"][split] = sum(TILE_OF in im for im in coco["images"])
    return summary


class _Ids:
    """The next free image and annotation id over all splits."""

    def __init__(self, cocos: dict[str, dict]) -> None:
        self.image = 1 + max((im["id"] for c in cocos.values() for im in c["images"]), default=0)
        self.ann = 1 + max((a["id"] for c in cocos.values() for a in c["annotations"]),
                           default=0)

    def take(self, kind: str) -> int:
        value = getattr(self, kind)
        setattr(self, kind, value + 1)
        return value


def _tiled_split(image_dir: Path, coco: dict, large: set[int], cfg: TileConfig,
                 ids: _Ids) -> dict:
    """``coco`` with the images of ``large`` replaced by their tiles (files written)."""
    objects = defaultdict(list)
    for ann in coco["annotations"]:
        objects[ann["image_id"]].append(ann)
    images = [im for im in coco["images"] if im["id"] not in large]
    annotations = [a for a in coco["annotations"] if a["image_id"] not in large]
    for image in coco["images"]:
        if image["id"] in large:
            for record, anns in _cut(image_dir, image, objects[image["id"]], cfg, ids):
                images.append(record)
                annotations.extend(anns)
    return {**coco, "images": images, "annotations": annotations}


def _cut(image_dir: Path, image: dict, anns: list[dict], cfg: TileConfig,
         ids: _Ids) -> list[tuple[dict, list[dict]]]:
    """Write ``image``'s tiles; per tile its image record and its annotations."""
    path = image_dir / image["file_name"]
    with Image.open(path) as pil:
        if pil.size != (image["width"], image["height"]):
            raise ValueError(f"prepare.tile: {path} is {pil.size[0]}x{pil.size[1]} px but its "
                             f"record says {image['width']}x{image['height']}")
        rgb = pil.convert("RGB")
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                         dtype=torch.float64).reshape(-1, 4)
    out = []
    for tile in tile_grid(image["height"], image["width"], size=cfg.size, overlap=cfg.overlap):
        name = _tile_name(image["file_name"], tile)
        target = image_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        crop = rgb.crop((tile.x0, tile.y0, tile.x0 + tile.width, tile.y0 + tile.height))
        crop.save(target, TILE_SUFFIXES[target.suffix], **({"quality": 95}
                                                            if target.suffix != ".png" else {}))
        record = {"id": ids.take("image"), "file_name": name, "width": tile.width,
                  "height": tile.height, TILE_OF: {"image_id": image["id"],
                                                   "file_name": image["file_name"],
                                                   "x0": tile.x0, "y0": tile.y0}}
        inside, kept = crop_boxes(boxes, tile, min_visible=cfg.min_visible)
        out.append((record, [_tile_annotation(anns[i], box, record["id"], ids)
                             for i, box in zip(kept.tolist(), inside.tolist(), strict=True)]))
    return out


def _tile_name(file_name: str, tile: Tile) -> str:
    """``tiles/<file_name without suffix>_<x0>_<y0><suffix>`` (a suffix other than .jpg,
    .jpeg, .png becomes .png)."""
    source = PurePosixPath(file_name)
    suffix = source.suffix.lower() if source.suffix.lower() in TILE_SUFFIXES else ".png"
    return f"{TILES_FOLDER}/{source.with_suffix('')}_{tile.x0}_{tile.y0}{suffix}"


def _tile_annotation(ann: dict, box: list[float], image_id: int, ids: _Ids) -> dict:
    """``ann`` with its box cut to the tile (``box``: xyxy tile pixels); area at most w x h."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    area = min(float(ann.get("area", w * h)), w * h)
    return {"id": ids.take("ann"), "image_id": image_id, "category_id": ann["category_id"],
            "bbox": [x1, y1, w, h], "area": area, "iscrowd": ann.get("iscrowd", 0)}


@flow(name="prepare", log_prints=True)
def prepare_flow(**kwargs) -> dict:
    return run(**kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines prepare")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=DATASET)
    args = parser.parse_args(argv)
    from pipelines.params import load

    params = load(args.params)
    model = params["model"]
    try:
        device = device_type(params["train"].device)
        stage.invoke(prepare_flow, run, cfg=params["prepare"], out_dir=args.out,
                     last_stage=model.last_stage, dilation=model.dilation,
                     feature_levels=model.feature_levels, device=device, task=model.task)
    except (OSError, ValueError, formats.FormatError) as exc:  # OSError: a link across disks
        print(f"prepare: {exc}", file=sys.stderr)
        return 2
    return 0
