"""The built-in demo dataset: coloured shapes on cluttered backgrounds, in the canonical layout.

:func:`generate` writes ``<root>/annotations/{train,val}.json`` (COCO) and JPEG images under
``<root>/images/{train,val}/``. Six classes differ by shape only (each object gets a random
saturated colour): circle/ellipse, square, triangle, star, cross, ring. Backgrounds are muted
gradients with low-frequency blotches, pixel noise, thin random lines and irregular blobs.

Objects are small, medium and large in COCO's terms (box area < 32^2, < 96^2, >= 96^2 px);
the first object of image ``i`` takes size range ``i % 3``, so every split of three or more
images at >= 160 px has all three. Later objects are drawn over earlier ones, but one that
would hide more than ``max_occlusion`` of an earlier object is redrawn elsewhere; boxes are the
full (amodal) pixel extent of each shape, which always lies inside the image.

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
from PIL import Image, ImageDraw

from detr.data.layout import SPLITS

CATEGORIES: tuple[dict[str, Any], ...] = tuple(
    {"id": i + 1, "name": name, "supercategory": "shape"}  # ids start at 1, as COCO's
    for i, name in enumerate(["circle", "square", "triangle", "star", "cross", "ring"])
)
DESCRIPTION = "detr-ops synthetic shapes"  # the json's info.description: marks a generated set
AREA_RANGES = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, math.inf)}
# Range of sqrt(box area) drawn per size class; small objects are at least ~14 px across.
_SIDE_RANGES = {"small": (14.0, 31.0), "medium": (32.0, 95.0), "large": (96.0, 176.0)}
_SIZE_WEIGHTS = {"small": 0.3, "medium": 0.45, "large": 0.25}
_ROTATABLE = {"square", "triangle", "star", "cross"}
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
    max_objects: int
    max_occlusion: float
    jpeg_quality: int


def _unit_polygon(name: str) -> np.ndarray:
    """Vertices [K, 2] of a shape inside [-1, 1]^2, y pointing down."""
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    if name == "triangle":
        return np.array([[0, -1], [1, 1], [-1, 1]], dtype=float)
    if name == "star":
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if name == "cross":
        t = 0.34
        return np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1],
                         [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t]], dtype=float)
    raise ValueError(f"no polygon for shape {name!r}")


def _shape_outline(rng: np.random.Generator, name: str, side: float) -> np.ndarray | tuple:
    """Outline centred on the origin: polygon vertices [K, 2], or ``(rx, ry)`` for ellipses."""
    aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
    rx, ry = side * math.sqrt(aspect) / 2, side / math.sqrt(aspect) / 2
    if name in ("circle", "ring"):
        return (rx, ry)
    points = _unit_polygon(name) * [rx, ry]
    angle = math.radians(rng.uniform(-30, 30)) if name in _ROTATABLE else 0.0
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = points @ rotation.T
    spans = points.max(axis=0) - points.min(axis=0)
    return points * (side / math.sqrt(spans[0] * spans[1]))  # box area = side^2, as drawn


def _draw_mask(
    name: str, outline: Any, centre: tuple[float, float], size: tuple[int, int]
) -> np.ndarray:
    """Bool mask [H, W] of the shape drawn at ``centre`` (x, y) on an ``size`` (H, W) canvas."""
    mask = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = centre
    if isinstance(outline, tuple):
        rx, ry = outline
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        if name == "ring":
            draw.ellipse([cx - 0.55 * rx, cy - 0.55 * ry, cx + 0.55 * rx, cy + 0.55 * ry], fill=0)
    else:
        draw.polygon([(float(x + cx), float(y + cy)) for x, y in outline], fill=255)
    return np.asarray(mask) > 0


def _extent(outline: Any) -> tuple[float, float, float, float]:
    """``(min_x, min_y, max_x, max_y)`` of an outline centred on the origin."""
    if isinstance(outline, tuple):
        return -outline[0], -outline[1], outline[0], outline[1]
    return (*outline.min(axis=0), *outline.max(axis=0))


def _pixel_box(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` of the pixels set in ``mask`` (pixel edges, not centres)."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]),
            float(rows[-1] + 1 - rows[0])]


def _size_class(area: float) -> str:
    return next(k for k, (lo, hi) in AREA_RANGES.items() if lo <= area < hi)


def _candidate(
    rng: np.random.Generator, size_class: str, height: int, width: int
) -> tuple[int, np.ndarray, list[float]] | None:
    """One random shape of ``size_class`` inside the image: ``(label, mask, box)`` or None."""
    label = int(rng.integers(len(CATEGORIES)))
    name = CATEGORIES[label]["name"]
    low, high = _SIDE_RANGES[size_class]
    side = rng.uniform(low, min(high, 0.8 * min(height, width)))
    outline = _shape_outline(rng, name, side)
    x0, y0, x1, y1 = _extent(outline)
    if x1 - x0 > width - 2 or y1 - y0 > height - 2:
        return None
    centre = (rng.uniform(1 - x0, width - 1 - x1), rng.uniform(1 - y0, height - 1 - y1))
    mask = _draw_mask(name, outline, centre, (height, width))
    if not mask.any():
        return None
    box = _pixel_box(mask)
    if _size_class(box[2] * box[3]) != size_class:
        return None
    return label, mask, box


def _size_classes(height: int, width: int) -> list[str]:
    """The size classes that fit: "large" needs a short side of at least ~120 px."""
    return [k for k in AREA_RANGES if _SIDE_RANGES[k][0] < 0.8 * min(height, width)]


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    hue, sat, val = rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.85)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A saturated colour that stands out from ``under`` (mean RGB of what it covers)."""
    for _ in range(10):
        rgb = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0),
                                           rng.uniform(0.55, 1.0))) * 255
        if np.linalg.norm(rgb - under) > 80:
            break
    return tuple(int(c) for c in rgb)


def _background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Muted two-colour gradient with low-frequency blotches, random lines and blobs."""
    c0, c1 = _muted_colour(rng), _muted_colour(rng)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = xx * math.cos(theta) + yy * math.sin(theta)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    pixels = c0 + (c1 - c0) * ramp[..., None]
    coarse = rng.normal(128, 20, (max(2, height // 32), max(2, width // 32), 3))
    blotches = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    pixels += np.asarray(blotches.resize((width, height), Image.BICUBIC), dtype=float) - 128
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    _draw_clutter(rng, ImageDraw.Draw(canvas), height, width)
    return canvas


def _draw_clutter(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, height: int, width: int
) -> None:
    """Distractors: thin lines of any colour and irregular muted blobs."""
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(7, 14))))
        radii = rng.uniform(4, 0.12 * min(height, width), angles.size)
        points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii, strict=True)]
        draw.polygon(points, fill=tuple(int(c) for c in _muted_colour(rng)))
    for _ in range(int(rng.integers(2, 9))):
        ends = rng.uniform(0, 1, 4) * [width, height, width, height]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line(list(map(float, ends)), fill=colour, width=int(rng.integers(1, 3)))


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


def _place_objects(rng: np.random.Generator, pixels: np.ndarray, job: _Job) -> list[tuple]:
    """Draw 1..max_objects shapes into ``pixels`` [H, W, 3]; returns ``(label, box)`` pairs."""
    classes = _size_classes(job.height, job.width)
    weights = np.array([_SIZE_WEIGHTS[k] for k in classes])
    scene, placed = _Scene(job.height, job.width, job.max_occlusion), []
    for k in range(int(rng.integers(1, job.max_objects + 1))):
        size_class = classes[job.index % len(classes)] if k == 0 else str(
            rng.choice(classes, p=weights / weights.sum()))
        for _ in range(_TRIES):
            found = _candidate(rng, size_class, job.height, job.width)
            if found is not None and scene.fits(found[1]):
                label, mask, box = found
                pixels[mask] = _object_colour(rng, pixels[mask].mean(axis=0))
                scene.add(mask)
                placed.append((label, box))
                break
    return placed


def _render(job: _Job) -> list[tuple]:
    """Draw image ``job.index``, save it to ``job.path``; returns its ``(label, box)`` pairs."""
    rng = np.random.default_rng([job.seed, job.split_index, job.index])
    pixels = np.asarray(_background(rng, job.height, job.width)).copy()
    objects = _place_objects(rng, pixels, job)
    noisy = pixels + rng.normal(0, rng.uniform(3, 10), pixels.shape)
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    image.save(job.path, format="JPEG", quality=job.jpeg_quality)
    return objects


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
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": [dict(c) for c in CATEGORIES]}


def _split_summary(coco: dict[str, Any]) -> dict[str, Any]:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_category = dict.fromkeys(names.values(), 0)
    area_ranges = dict.fromkeys(AREA_RANGES, 0)
    for ann in coco["annotations"]:
        per_category[names[ann["category_id"]]] += 1
        area_ranges[_size_class(ann["area"])] += 1
    return {"images": len(coco["images"]), "annotations": len(coco["annotations"]),
            "per_category": per_category, "area_ranges": area_ranges}


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


def _render_all(jobs: list[_Job], num_workers: int) -> list[list[tuple]]:
    """Render ``jobs`` in order, in ``num_workers`` processes (fork where the OS has it)."""
    if num_workers <= 1:
        return [_render(job) for job in jobs]
    # fork, as DataLoader workers: spawn would re-import the package (torch) in every worker.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(num_workers) as pool:
        return pool.map(_render, jobs, chunksize=max(1, len(jobs) // (8 * num_workers)))


def generate(
    root: str | Path,
    *,
    num_train: int = 2000,
    num_val: int = 500,
    image_size: int | tuple[int, int] = 256,
    max_objects: int = 6,
    seed: int = 0,
    num_workers: int = 2,
    max_occlusion: float = 0.3,
    jpeg_quality: int = 92,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the demo dataset under ``root`` in the canonical layout; return a summary.

    Args:
        image_size: ``(H, W)`` or one side of a square, in pixels (>= 64; >= 160 for large
            objects to exist).
        max_objects: each image has ``1..max_objects`` objects (fewer when placement fails).
        seed: a non-negative int; same seed and arguments -> byte-identical files.
        max_occlusion: largest fraction of an object that later objects may cover.
        overwrite: replace existing ``images/{split}`` folders and json files under ``root``.

    Returns:
        ``{"root", "seconds", "image_size": [H, W], "seed", "splits": {split: {"images",
        "annotations", "per_category": {name: n}, "area_ranges": {"small"|"medium"|"large": n}}}}``.

    Raises:
        ValueError: negative counts or seed, ``max_objects < 1``, or images smaller than 64 px.
        FileExistsError: the dataset exists under ``root`` and ``overwrite`` is False.
    """
    if min(num_train, num_val, seed) < 0 or max_objects < 1:
        raise ValueError("generate: num_train, num_val and seed must be >= 0, max_objects >= 1")
    start, root, (height, width) = time.perf_counter(), Path(root), _image_size(image_size)
    _prepare_dirs(root, overwrite)
    info = {"description": DESCRIPTION, "seed": seed, "version": "1"}
    summary: dict[str, Any] = {"root": str(root), "image_size": [height, width], "seed": seed}
    jobs = {split: [_Job(str(root / "images" / split / f"{i:06d}.jpg"), seed, SPLITS.index(split),
                         i, height, width, max_objects, max_occlusion, jpeg_quality)
                    for i in range(count)]
            for split, count in zip(SPLITS, (num_train, num_val), strict=True)}
    results = iter(_render_all([job for split in SPLITS for job in jobs[split]], num_workers))
    summary["splits"] = {}
    for split in SPLITS:
        coco = _coco_json(jobs[split], [next(results) for _ in jobs[split]], info)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(coco))
        summary["splits"][split] = _split_summary(coco)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m detr.data.synthetic --root data/demo``: generate and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    summary = generate(args.root, num_train=args.num_train, num_val=args.num_val,
                       image_size=args.image_size, seed=args.seed, num_workers=args.workers,
                       overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
