"""The built-in demo dataset: coloured shapes on cluttered backgrounds, in the canonical layout.

:func:`generate` writes ``<root>/annotations/{train,val}.json`` (COCO) and JPEG images under
``<root>/images/{train,val}/``. Six classes differ by shape only (each object gets a random
saturated colour): circle/ellipse, square, triangle, star, cross, ring (``classes=k``: the
first k). Backgrounds (:mod:`detr.data.synthetic_backgrounds`) are the demo's ``clutter``
(muted gradients with low-frequency blotches, thin random lines and irregular blobs) or
``texture`` (coloured noise, stripes and tiled motifs at several frequencies), plus pixel noise.

Object sizes (``object_sizes=None``, the demo): small, medium and large in COCO's terms (box
area < 32^2, < 96^2, >= 96^2 px); the first object of image ``i`` takes size range ``i % 3``,
so every split of three or more images at >= 160 px has all three. With ``object_sizes=(lo,
hi)`` every box's sqrt(area) lies in ``[lo, hi]`` px, drawn log-uniformly (as many objects
from 8 to 16 px as from 16 to 32). Later objects are drawn over earlier ones, but one that
would hide more than ``max_occlusion`` of an earlier object is redrawn elsewhere (up to 25
times, then left out: the summary counts them as ``skipped``); boxes are the full (amodal)
pixel extent of each shape, which always lies inside the image.

Segmentation (``masks=True``): every object annotation also gets ``segmentation``, the COCO RLE
of exactly the pixels the object shows in the image (the pixels its own mask drew that no later
object covers); its ``bbox`` and ``area`` are then those of these visible pixels, as in COCO
(without masks the box is the whole shape, hidden parts included, and ``area`` its w x h).
The images are the same with or without masks. ``stuff=k`` (panoptic segmentation) paints the
background as regions of k stuff classes (:mod:`detr.data.synthetic_stuff`; categories with
``isthing: 0``, things then carry ``isthing: 1``); each stuff class in an image is one
annotation of its visible pixels (with masks), so things and stuff tile the image.

Everything is a function of ``seed``: image ``i`` of a split draws from its own generator seeded
by ``(seed, split, i)``, so the bytes written do not depend on ``num_workers``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detr.data.layout import SPLITS
from detr.data.masks import mask_to_rle
from detr.data.synthetic_backgrounds import BACKGROUNDS
from detr.data.synthetic_scene import CATEGORIES, Job, place_objects
from detr.data.synthetic_shapes import pixel_box
from detr.data.synthetic_stuff import (
    MAX_STUFF,
    STUFF_CLASSES,
    paint_stuff,
    stuff_regions,
    stuff_segments,
)
from detr.data.synthetic_summary import split_summary

DESCRIPTION = "detr-ops synthetic shapes"  # the json's info.description: marks a generated set


def _render(job: Job) -> tuple[list[dict], int]:
    """Draw image ``job.index``, save it to ``job.path``; returns its annotations (without
    ids: ``category_id``, ``bbox``, ``area``, and ``segmentation`` with masks) and the number
    of objects skipped."""
    rng = np.random.default_rng([job.seed, job.split_index, job.index])
    pixels = np.asarray(BACKGROUNDS[job.background](rng, job.height, job.width)).copy()
    regions = None
    if job.stuff:  # its own random stream: scenes without stuff stay as they were
        stuff_rng = np.random.default_rng([job.seed, job.split_index, job.index, 1])
        regions = stuff_regions(stuff_rng, job.height, job.width, job.stuff)
        painted = pixels.astype(float)
        paint_stuff(stuff_rng, painted, regions)
        pixels = np.clip(painted, 0, 255).astype(np.uint8)
    objects, skipped, owner = place_objects(rng, pixels, job)
    noisy = pixels + rng.normal(0, rng.uniform(3, 10), pixels.shape)
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    image.save(job.path, format="JPEG", quality=job.jpeg_quality)
    return _annotations(job, objects, owner, regions), skipped


def _annotations(job: Job, objects: list[tuple], owner: np.ndarray,
                 regions: np.ndarray | None) -> list[dict]:
    """One image's annotations: its objects, then (with stuff) a segment per stuff class."""
    if not job.masks:
        found = [{"category_id": CATEGORIES[label]["id"], "bbox": box, "area": box[2] * box[3]}
                 for label, box in objects]
    else:
        found = [_segment(CATEGORIES[label]["id"], owner == k)
                 for k, (label, _) in enumerate(objects)]
    if regions is not None:
        for label, visible in stuff_segments(regions, owner):
            segment = _segment(_stuff_id(label), visible)
            found.append(segment if job.masks else {k: v for k, v in segment.items()
                                                     if k != "segmentation"})
    return found


def _segment(category_id: int, visible: np.ndarray) -> dict:
    """The annotation of the pixels ``visible`` [H, W] bool: their box, count and RLE."""
    return {"category_id": category_id, "bbox": pixel_box(visible),
            "area": float(visible.sum()), "segmentation": mask_to_rle(visible)}


def _stuff_id(label: int) -> int:
    """Category id of stuff class ``label``: after every thing class's (7, 8, ...)."""
    return len(CATEGORIES) + 1 + label


def _coco_json(jobs: list[Job], results: list[list[dict]], info: dict,
               knobs: dict[str, Any]) -> dict[str, Any]:
    """The COCO dict of one split; image ids are 1..N, annotation ids 1..M in image order."""
    images, annotations = [], []
    for image_id, (job, found) in enumerate(zip(jobs, results, strict=True), start=1):
        images.append({"id": image_id, "file_name": Path(job.path).name,
                       "width": job.width, "height": job.height})
        for ann in found:
            segmentation = ann.get("segmentation")
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": ann["category_id"], "bbox": ann["bbox"], "area": ann["area"],
                "iscrowd": 0, **({"segmentation": segmentation} if segmentation else {}),
            })
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories(knobs["classes"], knobs["stuff"])}


def categories(classes: int = len(CATEGORIES), stuff: int = 0) -> list[dict[str, Any]]:
    """The categories of a generated set: the first ``classes`` shapes, then ``stuff``
    stuff classes (``isthing`` 0; the shapes get ``isthing`` 1 only when there is stuff)."""
    things = [dict(c) for c in CATEGORIES[:classes]]
    if not stuff:
        return things
    return ([{**c, "isthing": 1} for c in things]
            + [{"id": _stuff_id(k), "name": STUFF_CLASSES[k][0], "supercategory": "stuff",
                "isthing": 0} for k in range(stuff)])


def _prepare_dirs(root: Path, overwrite: bool) -> None:
    for split in SPLITS:
        image_dir, ann = root / "images" / split, root / "annotations" / f"{split}.json"
        exists = ann.exists() or (image_dir.exists() and any(image_dir.iterdir()))
        if exists and not overwrite:
            raise FileExistsError(f"{image_dir} or {ann} already exists (pass overwrite=True)")
        if image_dir.exists():
            shutil.rmtree(image_dir)
        image_dir.mkdir(parents=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)


def _image_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if min(height, width) < 64:
        raise ValueError(f"generate: image_size must be at least 64 px, got {image_size}")
    return int(height), int(width)


def _render_all(jobs: list[Job], num_workers: int) -> list[tuple[list[dict], int]]:
    """Render ``jobs`` in order, in ``num_workers`` processes (fork where the OS has it)."""
    if num_workers <= 1:
        return [_render(job) for job in jobs]
    # fork, as DataLoader workers: spawn would re-import the package (torch) in every worker.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(num_workers) as pool:
        return pool.map(_render, jobs, chunksize=max(1, len(jobs) // (8 * num_workers)))


def _knobs(
    height: int, width: int, max_objects: int | None, objects: tuple[int, int] | None,
    object_sizes: tuple[float, float] | None, background: str, classes: int | None,
    masks: bool = False, stuff: int = 0,
) -> dict[str, Any]:
    """The checked scene knobs of :func:`generate`: ``objects``, ``object_sizes``,
    ``background``, ``classes``, ``masks``, ``stuff``, with the demo's values where not
    given."""
    if objects is not None and max_objects is not None:
        raise ValueError(f"generate: give objects {objects} or max_objects {max_objects}, "
                         "not both")
    low, high = objects if objects is not None else (1, 6 if max_objects is None else max_objects)
    if not 1 <= low <= high:
        raise ValueError(f"generate: objects per image must be 1 <= min <= max, got "
                         f"({low}, {high}) (objects / max_objects)")
    fits = 0.8 * min(height, width)
    if object_sizes is not None and not 4 <= object_sizes[0] <= object_sizes[1] <= fits:
        raise ValueError(f"generate: object_sizes {tuple(object_sizes)} must be 4 <= min <= "
                         f"max <= {fits:g} px (0.8 x the short side of image_size)")
    if background not in BACKGROUNDS:
        raise ValueError(f"generate: background {background!r} is not one of "
                         f"{', '.join(BACKGROUNDS)}")
    if classes is not None and not 1 <= classes <= len(CATEGORIES):
        raise ValueError(f"generate: classes must be 1..{len(CATEGORIES)}, got {classes}")
    if not 0 <= stuff <= MAX_STUFF:
        raise ValueError(f"generate: stuff must be 0..{MAX_STUFF} classes, got {stuff}")
    sizes = None if object_sizes is None else (float(object_sizes[0]), float(object_sizes[1]))
    return {"objects": (int(low), int(high)), "object_sizes": sizes, "background": background,
            "classes": len(CATEGORIES) if classes is None else int(classes),
            "masks": bool(masks), "stuff": int(stuff)}


def generate(
    root: str | Path,
    *,
    num_train: int = 2000,
    num_val: int = 500,
    image_size: int | tuple[int, int] = 256,
    max_objects: int | None = None,
    objects: tuple[int, int] | None = None,
    object_sizes: tuple[float, float] | None = None,
    background: str = "clutter",
    classes: int | None = None,
    masks: bool = False,
    stuff: int = 0,
    seed: int = 0,
    num_workers: int = 2,
    max_occlusion: float = 0.3,
    jpeg_quality: int = 92,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the demo dataset under ``root`` in the canonical layout; return a summary.

    The defaults are the demo's; a set made with other scene knobs (``objects``,
    ``object_sizes``, ``background``, ``classes``) records them in the json's
    ``info.generator``.

    Args:
        image_size: ``(H, W)`` or one side of a square, in pixels (>= 64; >= 160 for large
            objects to exist).
        max_objects: each image has ``1..max_objects`` objects (default 6); the same as
            ``objects=(1, max_objects)``.
        objects: ``(min, max)`` objects per image, drawn uniformly (fewer when placement
            fails: see ``skipped`` in the summary).
        object_sizes: ``(min, max)`` sqrt(box area) in px, 4 <= min <= max <= 0.8 x the short
            side, drawn log-uniformly; None: the demo's mix of COCO small, medium and large.
        background: ``"clutter"`` (the demo's) or ``"texture"`` (module docstring).
        classes: the first ``classes`` (1..6) shapes only; None: all six.
        masks: annotations carry ``segmentation`` (RLE of the visible pixels; module doc).
        stuff: 0..6 stuff classes painted as background regions, each an annotation.
        seed: a non-negative int; same seed and arguments -> byte-identical files.
        max_occlusion: largest fraction of an object that later objects may cover.
        overwrite: replace existing ``images/{split}`` folders and json files under ``root``.

    Returns:
        ``{"root", "seconds", "image_size": [H, W], "seed", "splits": {split: {"images",
        "annotations", "skipped" (objects that found no place), "objects_per_image": [min,
        max], "box_side_px": [min, max] (sqrt area), "per_category": {name: n},
        "area_ranges": {"small"|"medium"|"large": n}}}}``.

    Raises:
        ValueError: negative counts or seed, images smaller than 64 px, or a scene knob out
            of range (the message names it).
        FileExistsError: the dataset exists under ``root`` and ``overwrite`` is False.
    """
    if min(num_train, num_val, seed) < 0:
        raise ValueError("generate: num_train, num_val and seed must be >= 0")
    start, root, (height, width) = time.perf_counter(), Path(root), _image_size(image_size)
    knobs = _knobs(height, width, max_objects, objects, object_sizes, background, classes,
                   masks, stuff)
    _prepare_dirs(root, overwrite)
    info = {"description": DESCRIPTION, "seed": seed, "version": "1"}
    scene = (knobs["objects"][0], knobs["object_sizes"], knobs["background"], knobs["classes"],
             knobs["masks"], knobs["stuff"])
    if scene != (1, None, "clutter", len(CATEGORIES), False, 0):  # not the demo's: say how
        info["generator"] = {k: list(v) if isinstance(v, tuple) else v  # it was made
                             for k, v in knobs.items() if k not in ("masks", "stuff") or v}
    summary: dict[str, Any] = {"root": str(root), "image_size": [height, width], "seed": seed}
    jobs = {split: [Job(str(root / "images" / split / f"{i:06d}.jpg"), seed, SPLITS.index(split),
                         i, height, width, max_occlusion=max_occlusion,
                         jpeg_quality=jpeg_quality, **knobs)
                    for i in range(count)]
            for split, count in zip(SPLITS, (num_train, num_val), strict=True)}
    results = iter(_render_all([job for split in SPLITS for job in jobs[split]], num_workers))
    summary["splits"] = {}
    for split in SPLITS:
        done = [next(results) for _ in jobs[split]]
        coco = _coco_json(jobs[split], [found for found, _ in done], info, knobs)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(coco))
        summary["splits"][split] = split_summary(coco, sum(skipped for _, skipped in done))
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _pair(kind: type):
    """argparse type of one ``MIN,MAX`` pair."""
    def parse(text: str) -> tuple:
        parts = text.split(",")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"{text!r}: expected MIN,MAX")
        return kind(parts[0]), kind(parts[1])
    return parse


def main(argv: list[str] | None = None) -> None:
    """``python -m detr.data.synthetic --root data/demo``: generate and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=256, help="side of the square, px")
    parser.add_argument("--objects", type=_pair(int), default=None, metavar="MIN,MAX",
                        help="objects per image (default: 1,6)")
    parser.add_argument("--max-objects", type=int, default=None, help="same as --objects 1,N")
    parser.add_argument("--object-sizes", type=_pair(float), default=None, metavar="MIN,MAX",
                        help="sqrt(box area) in px, log-uniform (default: the demo's COCO "
                             "small/medium/large mix)")
    parser.add_argument("--background", choices=list(BACKGROUNDS), default="clutter")
    parser.add_argument("--classes", type=int, default=None, help="the first N of the six "
                        "shapes (default: all)")
    parser.add_argument("--masks", action="store_true", help="segmentation masks (RLE)")
    parser.add_argument("--stuff", type=int, default=0, help="stuff classes (0..6) painted "
                        "as background regions, for panoptic segmentation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    summary = generate(args.root, num_train=args.num_train, num_val=args.num_val,
                       image_size=args.image_size, max_objects=args.max_objects,
                       objects=args.objects, object_sizes=args.object_sizes,
                       background=args.background, classes=args.classes, masks=args.masks,
                       stuff=args.stuff, seed=args.seed,
                       num_workers=args.workers, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
