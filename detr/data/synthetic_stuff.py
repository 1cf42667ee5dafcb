"""Stuff classes of the synthetic dataset (:mod:`detr.data.synthetic`), for panoptic
segmentation: the background is cut into regions, each painted as one stuff class.

A scene with ``stuff = k`` classes splits the image into 2..4 regions (a Voronoi partition of
random seed points; each region gets one of the k classes at random, two regions may share
one). Each class has its own look, fixed by the class, so that a model can learn it: a colour
family (hue, saturation and value ranges) and a texture (value noise at a class-specific
cell size, or stripes), drawn over the image's background with some of the clutter showing
through. Objects are drawn on top afterwards; the stuff segment of a class is every pixel
of its regions that no object covers (COCO panoptic: one segment per stuff class and image).
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

# name, hue range, saturation, value, texture cell (px; 0 = stripes)
STUFF_CLASSES: tuple[tuple[str, tuple[float, float], float, float, int], ...] = (
    ("sky", (0.55, 0.62), 0.45, 0.9, 48),
    ("grass", (0.25, 0.33), 0.65, 0.55, 4),
    ("water", (0.5, 0.58), 0.7, 0.45, 0),
    ("sand", (0.1, 0.14), 0.45, 0.8, 8),
    ("road", (0.0, 1.0), 0.05, 0.35, 16),
    ("wall", (0.02, 0.05), 0.55, 0.6, 24),
)
MAX_STUFF = len(STUFF_CLASSES)
_SHOW_THROUGH = 0.2  # how much of the clutter background stays visible under the stuff


def stuff_regions(rng: np.random.Generator, height: int, width: int, stuff: int) -> np.ndarray:
    """int64 [H, W]: the stuff class (0..stuff-1) of every pixel, a Voronoi partition of 2..4
    random points, each region drawn one of the ``stuff`` classes."""
    points = int(rng.integers(2, 5))
    ys, xs = rng.uniform(0, height, points), rng.uniform(0, width, points)
    classes = rng.integers(stuff, size=points)
    yy, xx = np.mgrid[0:height, 0:width]
    nearest = np.argmin((yy[None] - ys[:, None, None]) ** 2 + (xx[None] - xs[:, None, None]) ** 2,
                        axis=0)
    return classes[nearest]


def paint_stuff(rng: np.random.Generator, pixels: np.ndarray, regions: np.ndarray) -> None:
    """Paint every class present in ``regions`` over ``pixels`` [H, W, 3] (float, in place)."""
    height, width = regions.shape
    for label in np.unique(regions):
        _, (hue_low, hue_high), sat, val, cell = STUFF_CLASSES[int(label)]
        base = np.array(colorsys.hsv_to_rgb(rng.uniform(hue_low, hue_high), sat,
                                            val * rng.uniform(0.9, 1.1))) * 255
        shade = _texture(rng, height, width, cell)
        where = regions == label
        look = base[None, :] * (0.75 + 0.5 * shade[where])[:, None]
        pixels[where] = (1 - _SHOW_THROUGH) * look + _SHOW_THROUGH * pixels[where]


def _texture(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """[H, W] in about [0, 1]: value noise of ``cell`` px, or (``cell`` 0) soft stripes."""
    if cell == 0:
        yy, xx = np.mgrid[0:height, 0:width]
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
        return 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    small = rng.uniform(0, 255, (max(1, height // cell), max(1, width // cell)))
    image = Image.fromarray(small.astype(np.uint8)).resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=float) / 255


def stuff_segments(regions: np.ndarray, owner: np.ndarray, min_area: int = 1
                   ) -> list[tuple[int, np.ndarray]]:
    """``(class, visible mask)`` of every stuff class with at least ``min_area`` pixels that
    no object covers (``owner`` -1), in class order."""
    free = owner < 0
    found = []
    for label in np.unique(regions):
        mask = (regions == label) & free
        if int(mask.sum()) >= min_area:
            found.append((int(label), mask))
    return found
