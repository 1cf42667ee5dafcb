"""Panoptic quality (Kirillov et al., "Panoptic Segmentation"), as panopticapi computes it.

Per image, a ground-truth and a predicted segment map (int [H, W]; 0 = void, else a segment
id) with their ``segments_info``: gt ``[{"id", "category_id", "iscrowd"}]``, pred
``[{"id", "category_id", ...}]``. Per category:

- a gt and a pred segment of that category *match* when their IoU > 0.5 (such a match is
  unique); the pred's pixels on gt void are left out of the union (IoU = |g & p| /
  (|g| + |p| - |g & p| - |p & void|)); crowd gt segments (``iscrowd=1``) are never matched;
- TP: matched pairs, summing their IoU; FN: unmatched non-crowd gt segments; FP: unmatched
  pred segments, except those whose pixels are more than half gt void or crowd regions of
  their own category (panopticapi has one crowd region per category and image; here all of
  that category's crowd segments count, the same for COCO panoptic);
- PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP (0 without TP), RQ = TP / (TP + FP/2
  + FN/2); PQ = SQ * RQ.

``PQ``/``SQ``/``RQ`` average over the categories with TP + FP + FN > 0; ``_th`` over those
that are things (``isthing`` 1, the default), ``_st`` over stuff (``isthing`` 0); -1.0 where
no category is there to average (e.g. ``PQ_st`` without stuff), as pycocotools' "undefined".

Deviation from panopticapi: it rejects a pred ``segments_info`` entry with no pixel in the
map; here such a segment is left out (it can be neither matched nor a false positive).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from detr.evaluation import load_ground_truth

STAT_NAMES: tuple[str, ...] = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th",
                               "PQ_st", "SQ_st", "RQ_st")
MATCH_IOU = 0.5
IGNORED_FRACTION = 0.5  # an unmatched pred more than this void/crowd is not a false positive


@dataclass(frozen=True)
class PanopticQuality:
    """PQ over a set of images.

    ``stats``: ``STAT_NAMES`` -> float (-1.0 undefined). ``per_class``: by category id,
    ``{"PQ", "SQ", "RQ", "TP", "FP", "FN"}``, or ``None`` for a category with no segment
    in gt or prediction. ``category_names``, ``isthing``: by category id.
    """

    stats: dict[str, float]
    per_class: dict[int, dict[str, float] | None]
    category_names: dict[int, str]
    isthing: dict[int, bool]
    num_images: int


@dataclass
class PanopticAccumulator:
    """TP, FP, FN and summed IoU per category over images (:meth:`add`), then
    :meth:`result`. ``categories``: COCO categories ``[{"id", "name", "isthing"?}]``."""

    categories: Sequence[Mapping]
    num_images: int = 0
    counts: dict[int, np.ndarray] = field(default_factory=dict)  # [tp, fp, fn, iou]

    def add(self, gt_map: object, gt_info: Sequence[Mapping], pred_map: object,
            pred_info: Sequence[Mapping], *, image_id: object = "?") -> None:
        """Count one image (module doc). Raises ``ValueError`` naming ``image_id`` for maps
        of different shapes, map ids missing from their ``segments_info``, or unknown
        category ids."""
        known = {int(c["id"]) for c in self.categories}
        for cat, values in image_counts(gt_map, gt_info, pred_map, pred_info,
                                        image_id=image_id, category_ids=known).items():
            self.counts[cat] = self.counts.get(cat, np.zeros(4)) + values
        self.num_images += 1

    def result(self) -> PanopticQuality:
        """The statistics and per-class numbers of the images added so far."""
        isthing = {int(c["id"]): bool(c.get("isthing", 1)) for c in self.categories}
        per_class = {cat: _class_numbers(self.counts.get(cat)) for cat in isthing}
        stats: dict[str, float] = {}
        for suffix, chosen in (("", None), ("_th", True), ("_st", False)):
            rows = [v for c, v in per_class.items()
                    if v is not None and (chosen is None or isthing[c] == chosen)]
            for name in ("PQ", "SQ", "RQ"):
                stats[name + suffix] = float(np.mean([r[name] for r in rows])) if rows else -1.0
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in self.categories}
        return PanopticQuality(stats, per_class, names, isthing, self.num_images)


def image_counts(gt_map: object, gt_info: Sequence[Mapping], pred_map: object,
                 pred_info: Sequence[Mapping], *, image_id: object = "?",
                 category_ids: Iterable[int] | None = None) -> dict[int, np.ndarray]:
    """``{category id: [TP, FP, FN, sum of TP IoUs]}`` of one image (module doc), for the
    categories with a segment in it."""
    gt_map, pred_map = np.asarray(gt_map), np.asarray(pred_map)
    if gt_map.shape != pred_map.shape or gt_map.ndim != 2:
        raise ValueError(f"image {image_id}: gt map {gt_map.shape} and pred map "
                         f"{pred_map.shape} must be the same [H, W]")
    gt_ids, gt_index = _dense(gt_map, gt_info, image_id, "gt")
    pred_ids, pred_index = _dense(pred_map, pred_info, image_id, "pred")
    width = len(pred_ids) + 1  # index 0: void / no segment
    inter = np.bincount((gt_index * width + pred_index).ravel(),
                        minlength=(len(gt_ids) + 1) * width).reshape(-1, width)
    gt_cat, crowd = _gt_columns(gt_info, gt_ids)
    pred_cat = _pred_categories(pred_info, pred_ids, image_id, category_ids)
    gt_area, pred_area = inter.sum(axis=1)[1:], inter.sum(axis=0)[1:]
    pair = inter[1:, 1:]
    union = gt_area[:, None] + pred_area[None, :] - pair - inter[0, 1:][None, :]
    iou = np.where(union > 0, pair / np.maximum(union, 1), 0.0)
    same = (gt_cat[:, None] == pred_cat[None, :]) & ~crowd[:, None]
    matched = same & (iou > MATCH_IOU)
    gt_hit, pred_hit = matched.any(axis=1), matched.any(axis=0)
    ignored = inter[0, 1:] + (pair * (crowd[:, None] & (gt_cat[:, None] == pred_cat))).sum(0)
    fp = ~pred_hit & (pred_area > 0) & (ignored <= IGNORED_FRACTION * pred_area)
    out: dict[int, np.ndarray] = {}
    for cat in set(gt_cat[~crowd].tolist()) | set(pred_cat[pred_area > 0].tolist()):
        out[int(cat)] = np.array([
            (matched & (gt_cat == cat)[:, None]).sum(),
            (fp & (pred_cat == cat)).sum(),
            (~gt_hit & ~crowd & (gt_cat == cat)).sum(),
            iou[matched & (gt_cat == cat)[:, None]].sum()], dtype=np.float64)
    return out


def evaluate_panoptic(coco_gt: COCO | str | Path, predictions: Mapping[int, Mapping[str, object]], *,
                      image_ids: Iterable[int] | None = None) -> PanopticQuality:
    """PQ of ``predictions`` (``{image_id: {"segments": int [H, W], "segments_info":
    [{"id", "category_id", ...}]}}``, the predictor's ``panoptic`` output at the original
    size) against the canonical json's masks (:func:`gt_panoptic_map`). Images without an
    entry are predicted empty (all their segments are false negatives). ``image_ids``:
    the images to score (default all of ``coco_gt``).

    Raises:
        ValueError: a malformed prediction or ground truth (names the image and the id).
    """
    coco_gt = load_ground_truth(coco_gt)
    chosen = sorted(coco_gt.getImgIds() if image_ids is None else {int(i) for i in image_ids})
    unknown = sorted({int(i) for i in predictions} - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"panoptic predictions name images not in the ground truth: "
                         f"{unknown[:10]}")
    accumulator = PanopticAccumulator(coco_gt.loadCats(coco_gt.getCatIds()))
    for image_id in chosen:
        gt_map, gt_info = gt_panoptic_map(coco_gt, image_id)
        entry = predictions.get(image_id)
        if entry is None:
            pred_map, pred_info = np.zeros_like(gt_map), []
        elif "segments" not in entry or "segments_info" not in entry:
            raise ValueError(f"panoptic prediction of image {image_id} lacks 'segments' or "
                             f"'segments_info' (has {sorted(entry)})")
        else:
            pred_map, pred_info = _as_numpy(entry["segments"]), entry["segments_info"]
        accumulator.add(gt_map, gt_info, pred_map, pred_info, image_id=image_id)
    return accumulator.result()


def gt_panoptic_map(coco_gt: COCO, image_id: int) -> tuple[np.ndarray, list[dict]]:
    """The ground-truth segment map of one image from its annotations' ``segmentation``
    (polygons or RLE): int32 [H, W] (0 = void; segment k = the image's k-th annotation by
    id, from 1) and ``segments_info`` ``[{"id", "category_id", "iscrowd", "annotation_id"}]``.

    Raises:
        ValueError: an annotation without ``segmentation``, or a pixel claimed by two
            annotations (names the image and both annotation ids).
    """
    image = coco_gt.imgs[image_id]
    segments = np.zeros((int(image["height"]), int(image["width"])), dtype=np.int32)
    owner: dict[int, int] = {}
    info = []
    anns = sorted(coco_gt.imgToAnns.get(image_id, []), key=lambda a: a["id"])
    for k, ann in enumerate(anns, start=1):
        if "segmentation" not in ann:
            raise ValueError(f"image {image_id}: annotation {ann['id']} has no segmentation "
                             "(panoptic ground truth needs masks)")
        mask = coco_gt.annToMask(ann).astype(bool)
        taken = segments[mask]
        if taken.any():
            other = owner[int(taken[taken > 0][0])]
            raise ValueError(f"image {image_id}: annotations {other} and {ann['id']} claim the "
                             "same pixels; a panoptic ground truth has one segment per pixel")
        segments[mask] = k
        owner[k] = ann["id"]
        info.append({"id": k, "category_id": int(ann["category_id"]),
                     "iscrowd": int(ann.get("iscrowd", 0)), "annotation_id": ann["id"]})
    return segments, info


def format_panoptic(result: PanopticQuality) -> str:
    """Aligned text: the all / things / stuff rows, then one row per category."""
    lines = [f"{'':<14}{'PQ':>7}{'SQ':>7}{'RQ':>7}"]
    for label, suffix in (("all", ""), ("things", "_th"), ("stuff", "_st")):
        values = [result.stats[name + suffix] for name in ("PQ", "SQ", "RQ")]
        lines.append(f"{label:<14}" + "".join(_cell(v) for v in values))
    for cat, numbers in result.per_class.items():
        name = result.category_names[cat][:13]
        cells = "   no segments" if numbers is None else "".join(
            _cell(numbers[k]) for k in ("PQ", "SQ", "RQ"))
        lines.append(f"{name:<14}{cells}")
    return "\n".join(lines)


def _cell(value: float) -> str:
    return f"{'n/a':>7}" if value == -1.0 else f"{100 * value:>7.1f}"


def _class_numbers(counts: np.ndarray | None) -> dict[str, float] | None:
    if counts is None or counts[:3].sum() == 0:
        return None
    tp, fp, fn, iou = (float(v) for v in counts)
    sq = iou / tp if tp else 0.0
    rq = tp / (tp + fp / 2 + fn / 2)
    return {"PQ": sq * rq, "SQ": sq, "RQ": rq, "TP": tp, "FP": fp, "FN": fn}


def _dense(segments: np.ndarray, info: Sequence[Mapping], image_id: object,
           what: str) -> tuple[np.ndarray, np.ndarray]:
    """The sorted segment ids of ``info`` and the map as indices into them (+1; 0 = void)."""
    ids = np.array(sorted(int(s["id"]) for s in info), dtype=np.int64)
    if (ids == 0).any() or len(set(ids.tolist())) != len(ids):
        raise ValueError(f"image {image_id}: {what} segments_info ids must be unique and "
                         f"not 0 (void): {ids.tolist()}")
    flat = segments.astype(np.int64)
    if len(ids):
        position = np.searchsorted(ids, flat)
        found = ids[np.minimum(position, len(ids) - 1)] == flat
    else:
        position, found = np.zeros(flat.shape, np.int64), np.zeros(flat.shape, bool)
    stray = (flat != 0) & ~found
    if stray.any():
        raise ValueError(f"image {image_id}: {what} map has segment ids "
                         f"{np.unique(flat[stray])[:10].tolist()} missing from its segments_info")
    return ids, np.where(found, position + 1, 0)


def _gt_columns(info: Sequence[Mapping], ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    by_id = {int(s["id"]): s for s in info}
    cats = np.array([int(by_id[i]["category_id"]) for i in ids.tolist()], dtype=np.int64)
    crowd = np.array([bool(by_id[i].get("iscrowd", 0)) for i in ids.tolist()], dtype=bool)
    return cats, crowd


def _pred_categories(info: Sequence[Mapping], ids: np.ndarray, image_id: object,
                     category_ids: Iterable[int] | None) -> np.ndarray:
    by_id = {int(s["id"]): int(s["category_id"]) for s in info}
    cats = np.array([by_id[i] for i in ids.tolist()], dtype=np.int64)
    if category_ids is not None:
        unknown = sorted(set(cats.tolist()) - set(category_ids))
        if unknown:
            raise ValueError(f"image {image_id}: predicted segments have category ids "
                             f"{unknown} that are not categories of the ground truth")
    return cats


def _as_numpy(value: object) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
