"""Backgrounds of the synthetic dataset (:mod:`detr.data.synthetic`), one function per kind.

Each takes the image's generator and its size and returns an RGB ``PIL.Image`` of ``(width,
height)``; everything drawn comes from ``rng``, so the image is a function of its seed.

- ``clutter`` (the demo's): a muted two-colour gradient with low-frequency blotches, thin random
  lines and irregular muted blobs. The shapes are saturated, so colour alone separates most.
- ``texture``: coloured value noise at three scales (cells of ~48, ~16 and ~5 px), under one
  to three oriented stripe patterns (soft or hard-edged, periods of 4-48 px) and often a tiled
  motif (checks, dots or a grid of 6-32 px). Colours span the whole gamut, saturated too, and
  the energy sits at the objects' own frequencies: edges are everywhere, and a shape has to be
  told from the background by its outline rather than by contrast.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw


def muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation RGB colour (floats 0..255)."""
    hue, sat, val = rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.85)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255


def clutter(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Muted two-colour gradient with low-frequency blotches, random lines and blobs."""
    c0, c1 = muted_colour(rng), muted_colour(rng)
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
        points = [(cx + r * math.cos(a), cy + r * math.sin(a))
                  for a, r in zip(angles, radii, strict=True)]
        draw.polygon(points, fill=tuple(int(c) for c in muted_colour(rng)))
    for _ in range(int(rng.integers(2, 9))):
        ends = rng.uniform(0, 1, 4) * [width, height, width, height]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line(list(map(float, ends)), fill=colour, width=int(rng.integers(1, 3)))


def texture(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Multi-scale coloured noise, oriented stripes and a tiled motif (module docstring)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    hue, sat, val = rng.uniform(), rng.uniform(0.0, 0.8), rng.uniform(0.3, 0.9)
    pixels = np.broadcast_to(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255,
                             (height, width, 3)).copy()
    for cell in (48, 16, 5):
        pixels += _value_noise(rng, height, width, cell) * rng.uniform(10, 40)
    for _ in range(int(rng.integers(1, 4))):
        _blend(pixels, _stripes(rng, xx, yy), _any_colour(rng), rng.uniform(0.3, 0.7))
    if rng.uniform() < 0.7:
        _blend(pixels, _motif(rng, xx, yy), _any_colour(rng), rng.uniform(0.3, 0.7))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _any_colour(rng: np.random.Generator) -> np.ndarray:
    """Any RGB colour, saturated or not (floats 0..255)."""
    hue, sat, val = rng.uniform(), rng.uniform(0.0, 1.0), rng.uniform(0.2, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """[H, W, 3] smooth noise, about zero mean and unit spread, varying every ~``cell`` px."""
    grid = rng.normal(128, 40, (height // cell + 2, width // cell + 2, 3))
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8))
    return (np.asarray(small.resize((width, height), Image.BICUBIC), dtype=float) - 128) / 40


def _stripes(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """[H, W] weights in [0, 1]: a sine grating, or its hard-edged square wave."""
    period = math.exp(rng.uniform(math.log(4), math.log(48)))
    theta, phase = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
    wave = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + phase)
    if rng.uniform() < 0.5:
        return (wave > rng.uniform(-0.5, 0.5)).astype(float)
    return 0.5 + 0.5 * wave


def _motif(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """[H, W] weights in {0, 1}: checks, dots or grid lines repeating every 6-32 px."""
    tile = int(rng.integers(6, 33))
    u, v = (xx + rng.integers(tile)) % tile, (yy + rng.integers(tile)) % tile
    kind = int(rng.integers(3))
    if kind == 0:
        return (((xx // tile) + (yy // tile)) % 2).astype(float)
    if kind == 1:
        radius = rng.uniform(0.15, 0.4) * tile
        return ((u - tile / 2) ** 2 + (v - tile / 2) ** 2 < radius**2).astype(float)
    line = max(1, int(rng.integers(1, max(2, tile // 4))))
    return ((u < line) | (v < line)).astype(float)


def _blend(pixels: np.ndarray, weight: np.ndarray, colour: np.ndarray, alpha: float) -> None:
    """``pixels`` [H, W, 3] mixed in place toward ``colour`` by ``alpha * weight`` [H, W]."""
    mix = (alpha * weight)[..., None]
    pixels *= 1 - mix
    pixels += mix * colour


BACKGROUNDS: dict[str, Callable[[np.random.Generator, int, int], Image.Image]] = {
    "clutter": clutter, "texture": texture}
