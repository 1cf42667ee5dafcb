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

Everything is a function of ``seed``: image ``i`` of a split draws from its own generator seeded
by ``(seed, split, i)``, so the bytes written do not depend on ``num_workers``.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import multiprocessing
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detr.data.layout import SPLITS
from detr.data.synthetic_backgrounds import BACKGROUNDS
from detr.data.synthetic_shapes import draw_mask, extent, pixel_box, shape_outline
from detr.data.synthetic_summary import AREA_RANGES, split_summary
from detr.data.synthetic_summary import size_class as area_class

CATEGORIES: tuple[dict[str, Any], ...] = tuple(
    {"id": i + 1, "name": name, "supercategory": "shape"}  # ids start at 1, as COCO's
    for i, name in enumerate(["circle", "square", "triangle", "star", "cross", "ring"])
)
DESCRIPTION = "detr-ops synthetic shapes"  # the json's info.description: marks a generated set
# Range of sqrt(box area) drawn per size class; small objects are at least ~14 px across.
_SIDE_RANGES = {"small": (14.0, 31.0), "medium": (32.0, 95.0), "large": (96.0, 176.0)}
_SIZE_WEIGHTS = {"small": 0.3, "medium": 0.45, "large": 0.25}
_TRIES = 25  # placement attempts per object before it is skipped


@dataclass(frozen=True)
class _Job:
    """Everything one worker needs to draw and save one image (picklable)."""

    path: str
    seed: int
    split_index: int
    index: int
    height: int
    width: int
    objects: tuple[int, int]  # fewest, most objects in the image
    max_occlusion: float
    jpeg_quality: int
    object_sizes: tuple[float, float] | None  # sqrt(box area) range in px; None: the demo's mix
    background: str  # a key of BACKGROUNDS
    classes: int  # labels are the first ``classes`` of CATEGORIES


def _side(rng: np.random.Generator, size_class: str | None, job: _Job) -> float:
    """sqrt(box area) to draw: uniform in ``size_class``'s range (the demo), else
    log-uniform in ``job.object_sizes``."""
    if size_class is None:
        low, high = job.object_sizes
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    low, high = _SIDE_RANGES[size_class]
    return rng.uniform(low, min(high, 0.8 * min(job.height, job.width)))


def _size_ok(box: list[float], size_class: str | None, job: _Job) -> bool:
    """Is the drawn (rasterised) box in ``size_class``, or in ``job.object_sizes``?"""
    if size_class is None:
        low, high = job.object_sizes
        return low <= math.sqrt(box[2] * box[3]) <= high
    return area_class(box[2] * box[3]) == size_class


def _candidate(
    rng: np.random.Generator, size_class: str | None, job: _Job
) -> tuple[int, np.ndarray, list[float]] | None:
    """One random shape inside the image, of ``size_class`` (None: of ``job.object_sizes``):
    ``(label, mask, box)``, or None when the drawn shape missed its size."""
    height, width = job.height, job.width
    label = int(rng.integers(job.classes))
    name = CATEGORIES[label]["name"]
    side = _side(rng, size_class, job)
    outline = shape_outline(rng, name, side)
    x0, y0, x1, y1 = extent(outline)
    if x1 - x0 > width - 2 or y1 - y0 > height - 2:
        return None
    centre = (rng.uniform(1 - x0, width - 1 - x1), rng.uniform(1 - y0, height - 1 - y1))
    mask = draw_mask(name, outline, centre, (height, width))
    if not mask.any():
        return None
    box = pixel_box(mask)
    if not _size_ok(box, size_class, job):
        return None
    return label, mask, box


def _size_classes(height: int, width: int) -> list[str]:
    """The size classes that fit: "large" needs a short side of at least ~120 px."""
    return [k for k in AREA_RANGES if _SIDE_RANGES[k][0] < 0.8 * min(height, width)]


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A saturated colour that stands out from ``under`` (mean RGB of what it covers)."""
    for _ in range(10):
        rgb = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0),
                                           rng.uniform(0.55, 1.0))) * 255
        if np.linalg.norm(rgb - under) > 80:
            break
    return tuple(int(c) for c in rgb)


class _Scene:
    """Objects placed so far: which object owns each pixel and how much of each is visible."""

    def __init__(self, height: int, width: int, max_occlusion: float) -> None:
        self.owner = np.full((height, width), -1, dtype=np.int32)
        self.full: list[int] = []
        self.visible: list[int] = []
        self.max_occlusion = max_occlusion

    def fits(self, mask: np.ndarray) -> bool:
        """Would drawing ``mask`` on top keep every earlier object visible enough?"""
        if not self.full:
            return True
        covered = np.bincount(self.owner[mask] + 1, minlength=len(self.full) + 1)[1:]
        left = np.array(self.visible) - covered
        return bool(np.all(left >= (1 - self.max_occlusion) * np.array(self.full)))

    def add(self, mask: np.ndarray) -> None:
        covered = np.bincount(self.owner[mask] + 1, minlength=len(self.full) + 1)[1:]
        self.visible = [v - int(c) for v, c in zip(self.visible, covered, strict=True)]
        self.owner[mask] = len(self.full)
        count = int(mask.sum())
        self.full.append(count)
        self.visible.append(count)


def _place_objects(
    rng: np.random.Generator, pixels: np.ndarray, job: _Job
) -> tuple[list[tuple], int]:
    """Draw ``job.objects[0]..job.objects[1]`` shapes into ``pixels`` [H, W, 3]; returns the
    ``(label, box)`` pairs placed and how many found no place (skipped)."""
    classes = _size_classes(job.height, job.width)
    weights = np.array([_SIZE_WEIGHTS[k] for k in classes])
    scene, placed, skipped = _Scene(job.height, job.width, job.max_occlusion), [], 0
    for k in range(int(rng.integers(job.objects[0], job.objects[1] + 1))):
        size_class = None if job.object_sizes is not None else (
            classes[job.index % len(classes)] if k == 0 else str(
                rng.choice(classes, p=weights / weights.sum())))
        for _ in range(_TRIES):
            found = _candidate(rng, size_class, job)
            if found is not None and scene.fits(found[1]):
                label, mask, box = found
                pixels[mask] = _object_colour(rng, pixels[mask].mean(axis=0))
                scene.add(mask)
                placed.append((label, box))
                break
        else:
            skipped += 1
    return placed, skipped


def _render(job: _Job) -> tuple[list[tuple], int]:
    """Draw image ``job.index``, save it to ``job.path``; returns its ``(label, box)`` pairs
    and the number of objects skipped."""
    rng = np.random.default_rng([job.seed, job.split_index, job.index])
    pixels = np.asarray(BACKGROUNDS[job.background](rng, job.height, job.width)).copy()
    objects, skipped = _place_objects(rng, pixels, job)
    noisy = pixels + rng.normal(0, rng.uniform(3, 10), pixels.shape)
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    image.save(job.path, format="JPEG", quality=job.jpeg_quality)
    return objects, skipped


def _coco_json(jobs: list[_Job], results: list[list[tuple]], info: dict) -> dict[str, Any]:
    """The COCO dict of one split; image ids are 1..N, annotation ids 1..M in image order."""
    images, annotations = [], []
    for image_id, (job, objects) in enumerate(zip(jobs, results, strict=True), start=1):
        images.append({"id": image_id, "file_name": Path(job.path).name,
                       "width": job.width, "height": job.height})
        for label, box in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": CATEGORIES[label]["id"], "bbox": box,
                "area": box[2] * box[3], "iscrowd": 0,
            })
    classes = jobs[0].classes if jobs else len(CATEGORIES)
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": [dict(c) for c in CATEGORIES[:classes]]}


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


def _render_all(jobs: list[_Job], num_workers: int) -> list[tuple[list[tuple], int]]:
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
) -> dict[str, Any]:
    """The checked scene knobs of :func:`generate`: ``objects``, ``object_sizes``,
    ``background``, ``classes``, with the demo's values where not given."""
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
    sizes = None if object_sizes is None else (float(object_sizes[0]), float(object_sizes[1]))
    return {"objects": (int(low), int(high)), "object_sizes": sizes, "background": background,
            "classes": len(CATEGORIES) if classes is None else int(classes)}


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
    knobs = _knobs(height, width, max_objects, objects, object_sizes, background, classes)
    _prepare_dirs(root, overwrite)
    info = {"description": DESCRIPTION, "seed": seed, "version": "1"}
    scene = (knobs["objects"][0], knobs["object_sizes"], knobs["background"], knobs["classes"])
    if scene != (1, None, "clutter", len(CATEGORIES)):  # not the demo's: say how it was made
        info["generator"] = {k: list(v) if isinstance(v, tuple) else v
                             for k, v in knobs.items()}
    summary: dict[str, Any] = {"root": str(root), "image_size": [height, width], "seed": seed}
    jobs = {split: [_Job(str(root / "images" / split / f"{i:06d}.jpg"), seed, SPLITS.index(split),
                         i, height, width, max_occlusion=max_occlusion,
                         jpeg_quality=jpeg_quality, **knobs)
                    for i in range(count)]
            for split, count in zip(SPLITS, (num_train, num_val), strict=True)}
    results = iter(_render_all([job for split in SPLITS for job in jobs[split]], num_workers))
    summary["splits"] = {}
    for split in SPLITS:
        done = [next(results) for _ in jobs[split]]
        coco = _coco_json(jobs[split], [objects for objects, _ in done], info)
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    summary = generate(args.root, num_train=args.num_train, num_val=args.num_val,
                       image_size=args.image_size, max_objects=args.max_objects,
                       objects=args.objects, object_sizes=args.object_sizes,
                       background=args.background, classes=args.classes, seed=args.seed,
                       num_workers=args.workers, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
