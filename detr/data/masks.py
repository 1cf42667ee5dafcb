"""COCO ``segmentation`` fields: check, decode and encode them with pycocotools.

A COCO annotation's ``segmentation`` is one of (as pycocotools reads it):

- polygons: ``[[x1, y1, x2, y2, ...], ...]``, absolute pixel coordinates, each polygon an even
  number (>= 6) of finite numbers;
- compressed RLE: ``{"size": [h, w], "counts": "<string>"}`` (COCO's LEB128-like string; bytes
  accepted too);
- uncompressed RLE: ``{"size": [h, w], "counts": [n0, n1, ...]}``, run lengths in column-major
  (Fortran) order, starting with background, summing to ``h * w``.

Masks are numpy uint8 arrays [H, W] with 1 inside. pycocotools' C decoder does not check an RLE
against its size (a bad string writes past the buffer), so :func:`decode_segmentation` checks
the run lengths in Python first. Errors are :class:`MaskError` naming ``where`` (the caller's
file and annotation id) and the field.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


class MaskError(ValueError):
    """A ``segmentation`` that cannot be decoded; the message names the file, record, field."""


def has_segmentation(ann: dict) -> bool:
    """Whether a COCO annotation carries a segmentation (an empty list, as box-only exports
    write it, is none)."""
    return ann.get("segmentation") not in (None, [], {})


def segmentation_problem(segm: Any) -> str | None:
    """Why ``segm`` is not a COCO segmentation by its structure (types, polygon lengths), or
    None. Does not decode: RLE strings and sizes are checked by :func:`decode_segmentation`."""
    if isinstance(segm, list):
        if not segm:
            return "no polygon (an empty list)"
        for i, poly in enumerate(segm):
            if not isinstance(poly, list) or not all(map(is_finite_number, poly)):
                return f"polygon {i} must be a list of finite numbers, got {_short(poly)}"
            if len(poly) % 2 or len(poly) < 6:
                return (f"polygon {i} has {len(poly)} coordinates: it needs an even number, "
                        f"at least 6 (3 points x, y)")
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(map(_is_count, size))):
            return f"RLE size must be [height, width], got {_short(size)}"
        if not isinstance(counts, str | bytes | list):
            return f"RLE counts must be a string or a list of ints, got {_short(counts)}"
        return None
    return f"expected polygons (a list) or an RLE (a dict), got {_short(segm)}"


def decode_segmentation(segm: Any, height: int, width: int, *, where: str = "") -> np.ndarray:
    """The mask of ``segm`` on an image of ``height`` x ``width``: uint8 [H, W], C order.

    Polygons are rasterised as pycocotools does (``annToMask``); their vertices may lie at
    most max(H, W) px outside the image. An RLE must have ``size == [height, width]``.

    Raises:
        MaskError: ``segm`` is malformed, its RLE does not decode or is of another size;
            the message starts with ``where``.
    """
    rle = segmentation_to_rle(segm, height, width, where=where)
    return np.ascontiguousarray(mask_utils.decode(rle))


def segmentation_to_rle(segm: Any, height: int, width: int, *, where: str = "") -> dict:
    """``segm`` as one compressed RLE (pycocotools' form: ``counts`` bytes), checked as
    :func:`decode_segmentation` documents."""
    problem = segmentation_problem(segm)
    if problem is None and isinstance(segm, dict):
        problem = _rle_problem(segm, height, width)
    elif problem is None:
        problem = _far_outside(segm, height, width)
    if problem is not None:
        raise MaskError(f"{where}: segmentation: {problem}" if where else problem)
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    counts = segm["counts"]
    return {"size": [height, width],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def segmentation_area(segm: Any, height: int, width: int, *, where: str = "") -> int:
    """Number of pixels of ``segm``'s mask (what COCO's ``area`` holds for a segmentation)."""
    return int(mask_utils.area(segmentation_to_rle(segm, height, width, where=where)))


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed RLE of a [H, W] mask (bool or 0/1 ints), JSON-ready: ``{"size": [h, w],
    "counts": str}``."""
    if mask.dtype == np.bool_:
        mask = mask.view(np.uint8)  # no copy: a Fortran-ordered mask is encoded as it is
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def crop_segmentation(segm: Any, height: int, width: int, region: tuple[int, int, int, int],
                      *, where: str = "") -> tuple[dict, int]:
    """The part of ``segm``'s mask (on a ``height`` x ``width`` image) inside ``region`` =
    ``(x0, y0, w, h)`` whole pixels (a tile): its JSON-ready RLE on the region's grid and its
    pixel count. Raises MaskError as :func:`decode_segmentation`."""
    x0, y0, w, h = region
    crop = decode_segmentation(segm, height, width, where=where)[y0:y0 + h, x0:x0 + w]
    return mask_to_rle(crop), int(np.count_nonzero(crop))


def mask_bbox(mask: np.ndarray) -> list[float] | None:
    """Tight ``[x, y, w, h]`` box of the mask's pixels (pixel edges, COCO's convention), or None
    for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    x0, y0 = int(cols[0]), int(rows[0])
    return [float(x0), float(y0), float(cols[-1] + 1 - x0), float(rows[-1] + 1 - y0)]


def polygons_bbox(polygons: list[list[float]]) -> list[float]:
    """``[x, y, w, h]`` enclosing every vertex of ``polygons`` (well formed, see above)."""
    xs = [v for poly in polygons for v in poly[0::2]]
    ys = [v for poly in polygons for v in poly[1::2]]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _far_outside(polygons: list[list[float]], height: int, width: int) -> str | None:
    """A vertex more than max(H, W) px outside the image: refused, as pycocotools would
    allocate along an outline of that length (and crash on a huge one)."""
    reach = max(height, width)
    for i, poly in enumerate(polygons):
        for x, y in zip(poly[0::2], poly[1::2], strict=True):
            if not (-reach <= x <= width + reach and -reach <= y <= height + reach):
                return (f"polygon {i} has the vertex ({x:g}, {y:g}) far outside the "
                        f"{width}x{height} (WxH) image")
    return None


def _rle_problem(segm: dict, height: int, width: int) -> str | None:
    size = [int(v) for v in segm["size"]]
    if size != [height, width]:
        return f"RLE size {size} is not the image's [height, width] [{height}, {width}]"
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(map(_is_count, counts)):
            return "uncompressed RLE counts must be non-negative integers"
    else:
        try:
            counts = rle_counts(counts)
        except ValueError as err:
            return f"compressed RLE counts do not decode: {err}"
    if sum(counts) != height * width:
        return (f"RLE run lengths sum to {sum(counts)}, not height x width = "
                f"{height * width}")
    return None


def rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed RLE string (pycocotools' ``rleFrString``, in Python).

    Raises:
        ValueError: a character outside ``'0'..'o'``, a truncated value, or a negative run.
    """
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("the string ends inside a value")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {text[p]!r} at {p} is not in '0'..'o'")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError(f"run {len(runs)} is negative ({x})")
        runs.append(x)
    return runs


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_finite_number(value: Any) -> bool:
    """A finite int or float (not a bool, not an int too large for a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
