"""COCO mask evaluation: COCOeval ``iouType="segm"``, the same 12 statistics as the box side.

Input contract: ``predictions`` maps an ``image_id`` of the ground truth to a dict with
``masks`` (bool [N, H, W] at the image's original size, row i = detection i, a Tensor or an
array; or, already encoded, a list of N COCO RLE dicts as :func:`encode_masks` returns, which
keeps a val split's worth of detections small), ``scores`` [N] and ``labels`` [N] (COCO
category ids); ``boxes`` may be there and are not used (COCO takes the box and the area of a
result from its mask). The ground truth (a ``COCO`` object or the path of the canonical json)
has a ``segmentation`` (polygons or RLE) on every annotation, and ``height``/``width`` on
every image.

Statistic names: ``MASK_STAT_NAMES``, ``mask_`` + :data:`detr.evaluation.STAT_NAMES`
(``mask_AP``, ``mask_AP50``, ..., ``mask_AR_large``), -1.0 where undefined, as there. Area
ranges use the ground truth's ``area`` field, as for boxes.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr.evaluation import (
    STAT_NAMES,
    CocoEvaluation,
    load_ground_truth,
    results_cocoeval,
    summarise,
)

MASK_PREFIX = "mask_"
MASK_STAT_NAMES: tuple[str, ...] = tuple(MASK_PREFIX + name for name in STAT_NAMES)
_KEYS = ("masks", "scores", "labels")


def mask_to_rle(mask: object) -> dict:
    """A bool (or 0/1) mask [H, W] as a compressed COCO RLE ``{"size": [H, W], "counts": str}``
    (``counts`` decoded to text, so the dict is JSON-ready)."""
    return encode_masks(_as_bool(mask)[None])[0]


def encode_masks(masks: object) -> list[dict]:
    """Bool masks [N, H, W] (Tensor or array) -> N compressed COCO RLE dicts, ``counts`` as
    text. Raises ``ValueError`` for an array that is not 3-d."""
    array = _as_bool(masks)
    if array.ndim != 3:
        raise ValueError(f"masks have shape {array.shape}, expected [N, H, W]")
    if not len(array):
        return []
    rles = mask_utils.encode(np.asfortranarray(array.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def to_segm_results(predictions: Mapping[int, Mapping[str, object]],
                    sizes: Mapping[int, tuple[int, int]] | None = None) -> list[dict]:
    """Detections with masks by image id -> COCO results: ``image_id``, ``category_id``,
    ``segmentation`` (RLE, ``counts`` text), ``score``.

    ``sizes``: ``(height, width)`` by image id; when given, every mask must have that size.
    Raises ``ValueError`` naming the image and the key of a malformed entry.
    """
    results: list[dict] = []
    for image_id, detections in predictions.items():
        image_id = int(image_id)
        missing = [key for key in _KEYS if key not in detections]
        if missing:
            raise ValueError(f"detections of image {image_id} lack {missing}")
        rles = _rles(image_id, detections["masks"])
        scores = _flat(detections["scores"])
        labels = _flat(detections["labels"])
        if not len(rles) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(rles)} masks, {len(scores)} scores, "
                             f"{len(labels)} labels")
        if sizes is not None and rles:
            _check_size(image_id, rles[0]["size"], sizes.get(image_id))
        results.extend({"image_id": image_id, "category_id": int(label), "segmentation": rle,
                        "score": float(score)}
                       for rle, score, label in zip(rles, scores, labels, strict=True))
    return results


def evaluate_masks(coco_gt: COCO | str | Path, predictions: Mapping[int, Mapping[str, object]],
                   *, image_ids: Iterable[int] | None = None) -> CocoEvaluation:
    """COCOeval ``iouType="segm"`` of ``predictions`` (module contract): a
    :class:`detr.evaluation.CocoEvaluation` with ``prefix="mask_"`` (``stats`` keyed by
    ``MASK_STAT_NAMES``, pycocotools' 12-line ``table``, per-class mask AP, PR curves).

    Images of the ground truth without an entry have no detections; ``image_ids`` restricts
    the evaluation as in :func:`detr.evaluation.evaluate_detections`.

    Raises:
        ValueError: a malformed prediction (image, key), a mask whose size is not its image's,
            an image id not in the ground truth, or a ground-truth annotation without
            ``segmentation``.
    """
    gt = load_ground_truth(coco_gt)
    sizes = {int(i): (int(img["height"]), int(img["width"])) for i, img in gt.imgs.items()}
    results = to_segm_results(predictions, sizes)
    evaluator = results_cocoeval(gt, results, iou_type="segm", image_ids=image_ids,
                                 predicted_ids=predictions)
    _evaluate_quietly(evaluator)
    return summarise(gt, evaluator, prefix=MASK_PREFIX)


def _evaluate_quietly(evaluator: COCOeval) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        evaluator.evaluate()
        evaluator.accumulate()


def _rles(image_id: int, masks: object) -> list[dict]:
    """The RLEs of one image's ``masks`` (bool [N, H, W] or a list of RLE dicts)."""
    if isinstance(masks, Sequence) and not isinstance(masks, np.ndarray) and (
            not masks or isinstance(masks[0], Mapping)):
        for k, rle in enumerate(masks):
            if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
                raise ValueError(f"masks of image {image_id}: entry {k} is not a COCO RLE "
                                 "dict with 'size' and 'counts'")
        return [dict(rle) for rle in masks]
    try:
        return encode_masks(masks)
    except ValueError as exc:
        raise ValueError(f"masks of image {image_id}: {exc}") from exc


def _check_size(image_id: int, size: Sequence[int], expected: tuple[int, int] | None) -> None:
    if expected is not None and tuple(int(s) for s in size) != expected:
        raise ValueError(f"masks of image {image_id} are {tuple(size)} (H, W), the image is "
                         f"{expected}: masks must be at the original image size")


def _as_bool(masks: object) -> np.ndarray:
    """Bool or integer (0 / non-0) masks as a bool array; float ones are refused: a
    probability map is not a mask until thresholded."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    array = np.asarray(masks)
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"masks have dtype {array.dtype}, expected bool [N, H, W] "
                         "(threshold mask probabilities first)")
    return array.astype(bool, copy=False)


def _flat(values: object) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy().reshape(-1)
    return np.asarray(values, dtype=np.float64).reshape(-1)
