"""``python -m detr.predict``: detect objects in images, write the detections and pictures.

::

    python -m detr.predict IMAGES... --model CHECKPOINT --out DIR
    python -m detr.predict photos/ --model official:r101-dc5 --out preds --score-threshold 0.7
    python -m detr.predict aerial/ --model best.pth --out preds --tile auto --overlap 0.2

``IMAGES``: image files and folders (a folder stands for its .jpg/.jpeg/.png/.bmp/.webp files,
sorted, not recursive). ``--model``: a training checkpoint of this project, or
``official[:VARIANT][:PATH]`` with VARIANT one of r50 (default), r50-dc5, r101, r101-dc5: the
official COCO weights of the release (downloaded), or those in the official-format file PATH.

Large images with small objects: ``--tile SIZE`` (pixels of the image, or ``auto``: the
model's val scale, so a tile is seen at its own resolution) predicts each image larger than
SIZE tile by tile, tiles overlapping by ``--overlap``, and merges the duplicates of the overlaps
(``--merge ios|iou`` at ``--merge-threshold``, ``--fuse`` for weighted box fusion;
``--tile-whole`` adds the whole image, downscaled, for objects larger than a tile); see
:mod:`detr.data.tiling`. Boxes are in the original image's pixels either way.

Writes ``DIR/detections.json``::

    {"images": [{"id": 0, "path": str, "height": int, "width": int, "drawing": "x.png"}, ...],
     "categories": [{"id": int, "name": str}, ...],
     "detections": [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]}

(``detections`` is in COCO results format; ``image_id`` is the index in ``images``) and one
``DIR/<stem>.png`` per image with its boxes drawn (``<stem>-<id>.png`` when stems repeat).

A segmentation model (one with a mask head): each detection also has ``segmentation``, its
mask as COCO RLE ``{"size": [h, w], "counts": str}`` (``pycocotools.mask.decode`` reads it),
and the drawings paint the masks, translucent in the class colour, under the boxes.
``--panoptic`` adds each image's panoptic map (:mod:`detr.masks_out`) in the COCO panoptic
form: ``DIR/<stem>-panoptic.png`` (segment id = R + 256 G + 256^2 B; 0 = void) and
``"panoptic": [{"image_id", "file_name", "segments_info": [{"id", "category_id",
"isthing", "score", "area"}, ...]}, ...]`` in ``detections.json``. Masks are not predicted tile
by tile: ``--tile`` with a segmentation model exits 2.
Exit status 2, with a message naming the culprit, for a missing or unreadable image or model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from detr.checkpoint import CheckpointError
from detr.data.coco import IMAGE_SUFFIXES, ImageLoadError
from detr.data.tiling import TileOptions
from detr.inference import Detections, Predictor, load_image
from detr.visualize import draw_detections

OFFICIAL_VARIANTS = {"r50": ("resnet50", False), "r50-dc5": ("resnet50", True),
                     "r101": ("resnet101", False), "r101-dc5": ("resnet101", True)}


class UsageError(Exception):
    """A command-line input (image, folder, model) that cannot be used; exit status 2."""


class ModelSpec(NamedTuple):
    """What ``--model`` names: a training checkpoint, or an official variant and its weights
    (``True``: the release's download; a path: an official-format file)."""

    official: bool
    source: Path | bool
    variant: str = "r50"


def parse_model(spec: str) -> ModelSpec:
    """``CHECKPOINT`` or ``official[:VARIANT][:PATH]`` -> :class:`ModelSpec` (no file access)."""
    if spec != "official" and not spec.startswith("official:"):
        return ModelSpec(False, Path(spec))
    rest = spec.partition(":")[2]
    variant, _, path = rest.partition(":")
    if variant in OFFICIAL_VARIANTS:
        return ModelSpec(True, Path(path) if path else True, variant)
    if not rest:
        return ModelSpec(True, True)
    return ModelSpec(True, Path(rest))  # official:PATH, the R50 architecture


def expand_images(sources: Sequence[str | Path]) -> list[Path]:
    """Image files, with each folder replaced by its image files (sorted, not recursive).

    Raises:
        UsageError: a source that does not exist, or a folder without image files.
    """
    paths: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"{source}: folder has no image files "
                                 f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif source.is_file():
            paths.append(source)
        else:
            raise UsageError(f"{source}: image not found")
    return paths


def load_predictor(spec: ModelSpec, **options) -> Predictor:
    """The :class:`Predictor` of ``spec``; ``options`` go to its constructor.

    Raises:
        UsageError: the checkpoint file is missing or cannot be used (the message names it).
    """
    if isinstance(spec.source, Path) and not spec.source.is_file():
        raise UsageError(f"{spec.source}: model checkpoint not found")
    try:
        if not spec.official:
            return Predictor.from_checkpoint(spec.source, **options)
        backbone, dilation = OFFICIAL_VARIANTS[spec.variant]
        return Predictor.from_official(spec.source, backbone=backbone, dilation=dilation,
                                       **options)
    except CheckpointError as exc:
        raise UsageError(f"cannot load the model: {exc}") from exc


def output_names(paths: Sequence[Path]) -> list[str]:
    """``<stem>.png`` per image; ``<stem>-<index>.png`` for a stem already taken."""
    names: list[str] = []
    for index, path in enumerate(paths):
        name = f"{path.stem}.png"
        names.append(name if name not in names else f"{path.stem}-{index}.png")
    return names


def run(paths: Sequence[Path], predictor: Predictor, out_dir: Path, *,
        batch_size: int = 8, tile: TileOptions | None = None, panoptic: bool = False) -> dict:
    """Predict on ``paths`` (tile by tile with ``tile``: ``batch_size`` tiles a pass), draw
    each image to ``out_dir`` and write ``detections.json``; returns its content (see the
    module docstring). ``panoptic``: also write each image's panoptic map (segmentation
    models only).

    Raises:
        UsageError: an image that cannot be read (the message names it).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    drawings = output_names(paths)
    images, results, maps = [], [], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        try:
            pixels = [load_image(p) for p in chunk]
        except ImageLoadError as exc:
            raise UsageError(str(exc)) from exc
        found = predictor.predict(pixels, batch_size=batch_size, tile=tile, panoptic=panoptic)
        for offset, (image, det) in enumerate(zip(pixels, found, strict=True)):
            index = start + offset
            _draw(image, det, predictor, out_dir / drawings[index])
            images.append({"id": index, "path": str(paths[index]), "height": det.image_size[0],
                           "width": det.image_size[1], "drawing": drawings[index]})
            results.extend(det.to_coco(index))
            if det.panoptic is not None:
                maps.append(_save_panoptic(det.panoptic, index, out_dir, drawings[index]))
    content = {"images": images, "categories": _categories(predictor), "detections": results}
    if panoptic:
        content["panoptic"] = maps
    (out_dir / "detections.json").write_text(json.dumps(content, indent=1) + "\n")
    return content


def _draw(image, det: Detections, predictor: Predictor, path: Path) -> None:
    drawn = draw_detections(image, det.boxes, det.labels, det.scores,
                            names=predictor.category_names, score_threshold=0.0,
                            masks=det.masks)
    drawn.save(path)


def _save_panoptic(panoptic: dict, index: int, out_dir: Path, drawing: str) -> dict:
    """Write the segment map as a COCO panoptic PNG; its annotation entry (module doc)."""
    name = drawing.removesuffix(".png") + "-panoptic.png"
    ids = panoptic["segments"].numpy().astype(np.uint32)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1)
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(out_dir / name)
    return {"image_id": index, "file_name": name, "segments_info": panoptic["segments_info"]}


def _categories(predictor: Predictor) -> list[dict]:
    return [{"id": cid, "name": name} for cid, name in predictor.category_names.items()
            if name != "N/A"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m detr.predict", description="Detect objects in images with DETR.")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--model", required=True,
                        help="training checkpoint, or official[:r50|r50-dc5|r101|r101-dc5][:PATH]")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--nms", type=float, metavar="IOU", default=None,
                        help="class-wise NMS at this IoU: at most one box per object and "
                             "class (as the evaluate stage's evaluate.nms); default off")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--panoptic", action="store_true",
                        help="segmentation models: also write each image's panoptic map "
                             "(COCO panoptic PNG + segments_info)")
    tiles = parser.add_argument_group("tiled prediction (large images, small objects)")
    tiles.add_argument("--tile", metavar="SIZE|auto",
                       help="predict images larger than SIZE px tile by tile; auto: the "
                            "model's val scale")
    tiles.add_argument("--overlap", type=float, default=0.2,
                       help="least fraction of a tile shared with its neighbour")
    tiles.add_argument("--tile-whole", action="store_true",
                       help="also predict the whole image, downscaled, and merge it in")
    tiles.add_argument("--merge", default="ios", choices=("ios", "iou"),
                       help="duplicates across tiles: intersection over the smaller box "
                            "(default), or IoU (class-wise NMS)")
    tiles.add_argument("--merge-threshold", type=float, default=0.5)
    tiles.add_argument("--fuse", action="store_true",
                       help="weighted box fusion: a merged box is its group's score-weighted "
                            "mean")
    return parser


def tile_options(args: argparse.Namespace, predictor: Predictor) -> TileOptions | None:
    """The :class:`TileOptions` of ``--tile`` and its companions; None without ``--tile``."""
    if args.tile is None:
        return None
    if args.tile != "auto" and not args.tile.isdigit():
        raise UsageError(f"--tile: {args.tile!r} is neither a number of pixels nor 'auto'")
    return predictor.tiling(args.tile, overlap=args.overlap, whole=args.tile_whole,
                            match=args.merge, threshold=args.merge_threshold, fuse=args.fuse)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: an unusable input, named on stderr)."""
    args = _parser().parse_args(argv)
    try:
        paths = expand_images(args.images)
        predictor = load_predictor(
            parse_model(args.model), device=args.device, precision=args.precision,
            score_threshold=args.score_threshold, top_k=args.top_k, nms=args.nms)
        content = run(paths, predictor, args.out, batch_size=args.batch_size,
                      tile=tile_options(args, predictor), panoptic=args.panoptic)
    except (UsageError, ValueError) as exc:
        print(f"detr.predict: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(content['detections'])} detections in {len(paths)} images -> "
          f"{args.out / 'detections.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
