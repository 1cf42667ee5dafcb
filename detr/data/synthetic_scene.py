"""Objects of the synthetic dataset (:mod:`detr.data.synthetic`): one image's job, and the
shapes placed on it.

``Job`` is all a worker needs to draw one image. :func:`place_objects` draws
``job.objects[0]..job.objects[1]`` shapes of the job's classes and sizes (the demo's COCO
small / medium / large mix, or ``object_sizes``) in saturated colours that stand out from what
they cover; a shape that would hide more than ``max_occlusion`` of an earlier one is redrawn
elsewhere (up to :data:`TRIES` times, then skipped). It also returns which object shows at
each pixel, from which the masks of the visible pixels come.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from detr.data.synthetic_shapes import draw_mask, extent, pixel_box, shape_outline
from detr.data.synthetic_summary import AREA_RANGES
from detr.data.synthetic_summary import size_class as area_class

CATEGORIES: tuple[dict[str, Any], ...] = tuple(
    {"id": i + 1, "name": name, "supercategory": "shape"}  # ids start at 1, as COCO's
    for i, name in enumerate(["circle", "square", "triangle", "star", "cross", "ring"])
)

# Range of sqrt(box area) drawn per size class; small objects are at least ~14 px across.
_SIDE_RANGES = {"small": (14.0, 31.0), "medium": (32.0, 95.0), "large": (96.0, 176.0)}
_SIZE_WEIGHTS = {"small": 0.3, "medium": 0.45, "large": 0.25}
TRIES = 25  # placement attempts per object before it is skipped


@dataclass(frozen=True)
class Job:
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
    masks: bool = False  # annotations carry the visible pixels' RLE (module doc)
    stuff: int = 0  # stuff classes painted as background regions (module doc)


def _side(rng: np.random.Generator, size_class: str | None, job: Job) -> float:
    """sqrt(box area) to draw: uniform in ``size_class``'s range (the demo), else
    log-uniform in ``job.object_sizes``."""
    if size_class is None:
        low, high = job.object_sizes
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    low, high = _SIDE_RANGES[size_class]
    return rng.uniform(low, min(high, 0.8 * min(job.height, job.width)))


def _size_ok(box: list[float], size_class: str | None, job: Job) -> bool:
    """Is the drawn (rasterised) box in ``size_class``, or in ``job.object_sizes``?"""
    if size_class is None:
        low, high = job.object_sizes
        return low <= math.sqrt(box[2] * box[3]) <= high
    return area_class(box[2] * box[3]) == size_class


def _candidate(
    rng: np.random.Generator, size_class: str | None, job: Job
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


def place_objects(
    rng: np.random.Generator, pixels: np.ndarray, job: Job
) -> tuple[list[tuple], int, np.ndarray]:
    """Draw ``job.objects[0]..job.objects[1]`` shapes into ``pixels`` [H, W, 3]; returns the
    ``(label, box)`` pairs placed, how many found no place (skipped) and which object shows
    at each pixel (int32 [H, W], -1 for none)."""
    classes = _size_classes(job.height, job.width)
    weights = np.array([_SIZE_WEIGHTS[k] for k in classes])
    scene, placed, skipped = _Scene(job.height, job.width, job.max_occlusion), [], 0
    for k in range(int(rng.integers(job.objects[0], job.objects[1] + 1))):
        size_class = None if job.object_sizes is not None else (
            classes[job.index % len(classes)] if k == 0 else str(
                rng.choice(classes, p=weights / weights.sum())))
        for _ in range(TRIES):
            found = _candidate(rng, size_class, job)
            if found is not None and scene.fits(found[1]):
                label, mask, box = found
                pixels[mask] = _object_colour(rng, pixels[mask].mean(axis=0))
                scene.add(mask)
                placed.append((label, box))
                break
        else:
            skipped += 1
    return placed, skipped, scene.owner

