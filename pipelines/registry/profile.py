"""The profile of a dataset version: the statistics that data drift is measured on.

:func:`dataset_profile` reads a canonical dataset (``annotations/{train,val}.json`` +
``images/<split>/``, :mod:`detr.data.layout`), every split it has pooled, and returns plain JSON:

- ``version`` (1), ``splits``, ``images``, ``boxes``;
- ``class_balance``: ``{category name: boxes}``;
- ``boxes_per_image``: counts of images with 0, 1, ..., 15 and 16 or more boxes (17 ints);
- ``box_size``: ``{"edges", "counts", "mean"}``: boxes by ``sqrt(w * h)`` in px of the COCO
  ``bbox``, in half-octave bins (``edges``: the lower edges, px; the last bin is open), and
  the mean;
- ``image_size``: the same for the longer side of each image (declared ``width`` / ``height``,
  which validate checked against the file), plus ``mean_width`` and ``mean_height``;
- ``colour``: ``{"sampled", "mean", "std"}``: per-channel (R, G, B, 0-255) mean and std of the
  pixels of ``sample_images`` images, evenly spaced over (split, file name) order, each decoded
  as a thumbnail of at most 64 px (JPEG draft mode: ~1 ms an image), so the cost does not grow
  with the dataset. Unreadable files are skipped (validate names them).

No MLflow, no Prefect: :mod:`pipelines.registry.drift` stores and compares profiles.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from detr.data.layout import SPLITS, is_unsafe_file_name

VERSION = 1
MAX_BOXES_BIN = 16  # the last boxes-per-image bin: 16 or more
SIZE_EDGES = tuple(round(2 ** (k / 2), 1) for k in range(4, 25))  # 4 px ... 4096 px
THUMBNAIL = 64  # px: colour statistics of each sampled image are taken at this size


def dataset_profile(dataset_dir: str | Path, *, sample_images: int = 64) -> dict[str, Any]:
    """The profile of ``dataset_dir`` (module doc).

    Raises:
        FileNotFoundError: ``dataset_dir`` has no ``annotations/<split>.json`` at all.
        ValueError: an annotation file is not JSON.
    """
    root = Path(dataset_dir)
    splits = {s: json.loads(p.read_bytes()) for s in SPLITS
              if (p := root / "annotations" / f"{s}.json").is_file()}
    if not splits:
        raise FileNotFoundError(f"{root}: no annotations/{{{','.join(SPLITS)}}}.json: not a "
                                f"canonical dataset (run the prepare stage)")
    images = [(s, im) for s, data in splits.items() for im in data.get("images", [])]
    boxes = [a for data in splits.values() for a in data.get("annotations", [])]
    sides = [max(_number(im.get("width")), _number(im.get("height"))) for _, im in images]
    box_sides = [np.sqrt(max(_number(a["bbox"][2]) * _number(a["bbox"][3]), 0.0))
                 for a in boxes if _is_box(a.get("bbox"))]
    return {
        "version": VERSION, "splits": list(splits), "images": len(images), "boxes": len(boxes),
        "class_balance": _class_balance(splits),
        "boxes_per_image": _boxes_per_image(splits),
        "box_size": _histogram(box_sides),
        "image_size": {**_histogram(sides),
                       "mean_width": _mean([_number(im.get("width")) for _, im in images]),
                       "mean_height": _mean([_number(im.get("height")) for _, im in images])},
        "colour": colour_statistics(root, images, sample_images),
    }


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _is_box(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 4) if values else 0.0


def _class_balance(splits: dict[str, dict]) -> dict[str, int]:
    names: dict[Any, str] = {}
    for data in splits.values():
        names.update({c.get("id"): str(c.get("name")) for c in data.get("categories", [])})
    counts: dict[str, int] = {}
    for data in splits.values():
        for a in data.get("annotations", []):
            name = names.get(a.get("category_id"), "<unknown>")
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _boxes_per_image(splits: dict[str, dict]) -> list[int]:
    counts = np.zeros(MAX_BOXES_BIN + 1, dtype=int)
    for data in splits.values():
        per_image = {im.get("id"): 0 for im in data.get("images", [])}
        for a in data.get("annotations", []):
            if a.get("image_id") in per_image:
                per_image[a["image_id"]] += 1
        for n in per_image.values():
            counts[min(n, MAX_BOXES_BIN)] += 1
    return counts.tolist()


def _histogram(values: list[float]) -> dict[str, Any]:
    """``values`` (px) counted in the half-octave bins of ``SIZE_EDGES`` (below the first
    edge: the first bin)."""
    index = np.searchsorted(SIZE_EDGES, np.asarray(values, dtype=float), side="right") - 1
    counts = np.bincount(np.clip(index, 0, len(SIZE_EDGES) - 1), minlength=len(SIZE_EDGES))
    return {"edges": list(SIZE_EDGES), "counts": counts.tolist(), "mean": _mean(values)}


def colour_statistics(root: Path, images: list[tuple[str, dict]], sample: int
                      ) -> dict[str, Any]:
    """Per-channel mean and std (0-255) over the pixels of up to ``sample`` images of
    ``images`` (``(split, COCO image record)``), evenly spaced in (split, file name) order."""
    names = sorted((split, im["file_name"]) for split, im in images
                   if isinstance(im.get("file_name"), str) and im["file_name"]
                   and not is_unsafe_file_name(im["file_name"]))
    picks = sorted({round(i) for i in np.linspace(0, len(names) - 1, min(sample, len(names)))}) \
        if names else []
    total, squares, pixels, read = np.zeros(3), np.zeros(3), 0, 0
    for i in picks:
        split, name = names[i]
        rgb = _thumbnail(root / "images" / split / PurePosixPath(name))
        if rgb is None:
            continue
        total += rgb.sum(axis=0)
        squares += (rgb**2).sum(axis=0)
        pixels += len(rgb)
        read += 1
    if not pixels:
        return {"sampled": 0, "mean": None, "std": None}
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 0.0))
    return {"sampled": read, "mean": [round(float(m), 3) for m in mean],
            "std": [round(float(s), 3) for s in std]}


def _thumbnail(path: Path) -> np.ndarray | None:
    """The image's pixels as float64 [N, 3] RGB at most THUMBNAIL px a side; None if unreadable."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMBNAIL, THUMBNAIL))  # JPEG: decode at a reduced scale
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            return np.asarray(image, dtype=np.float64).reshape(-1, 3)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None
