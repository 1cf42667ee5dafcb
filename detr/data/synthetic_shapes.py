"""The shapes of the synthetic dataset (:mod:`detr.data.synthetic`): outlines, masks, boxes.

A shape is an outline centred on the origin: polygon vertices [K, 2] (square, triangle, star,
cross; y pointing down) or ``(rx, ry)`` radii (circle/ellipse, ring). :func:`shape_outline`
scales it so that its box area is ``side**2``; :func:`draw_mask` rasterises it at a centre;
:func:`pixel_box` is the COCO box of the pixels drawn.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

_ROTATABLE = {"square", "triangle", "star", "cross"}


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


def shape_outline(rng: np.random.Generator, name: str, side: float) -> np.ndarray | tuple:
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


def draw_mask(
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


def extent(outline: Any) -> tuple[float, float, float, float]:
    """``(min_x, min_y, max_x, max_y)`` of an outline centred on the origin."""
    if isinstance(outline, tuple):
        return -outline[0], -outline[1], outline[0], outline[1]
    return (*outline.min(axis=0), *outline.max(axis=0))


def pixel_box(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` of the pixels set in ``mask`` (pixel edges, not centres)."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]),
            float(rows[-1] + 1 - rows[0])]
