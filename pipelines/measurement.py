"""Measure a checkpoint on a dataset's val split: the evaluation the ``evaluate`` stage reports
and the ``register`` stage repeats on the champion, so that both numbers come from one code path
and one set of settings.

Settings: ``evaluate.batch_size``; the val resize the checkpoint was trained for (its params'
``data.scales`` and ``data.max_size``; ``data``'s for checkpoints without them),
``data.num_workers``; device and precision from ``train`` (``device``, ``precision``,
``channels_last``); ``evaluate.nms`` (class-wise NMS on the detections). With ``evaluate.tile`` the val images are whole (``val_whole.json`` of a
tiled dataset, else ``val.json``) and predicted tile by tile by a
:class:`detr.inference.Predictor` (``evaluate.batch_size`` tiles a pass, the same device and
precision), every image's best 100 merged detections kept (COCO's maxDets).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from detr.checkpoint import CheckpointError, load_file
from detr.config import DataConfig, ModelConfig, TrainConfig
from detr.data.batching import collate
from detr.data.coco import CocoDetection, category_ids_from_label_map
from detr.data.layout import whole_annotation_name
from detr.data.tiling import TileOptions
from detr.data.transforms import make_transforms
from detr.device import resolve_precision, select_device
from detr.duplicates import class_wise_nms
from detr.engine import evaluate, evaluate_layers
from detr.evaluation import CocoEvaluation, evaluate_detections
from detr.hub import model_from_checkpoint, val_resize
from detr.inference import Predictor
from detr.masks_out import MaskOutputs, has_mask_head
from detr.models.postprocess import PostProcess
from pipelines.params import EvaluateConfig, EvaluateTileConfig

COCO_MAX_DETS = 100  # COCOeval's largest maxDets: what a tiled prediction keeps per image

ALL = "all"  # reserved: the name of the mean over the classes (PR curves, tables)


class EvaluationInputError(ValueError):
    """The checkpoint and the dataset do not belong together (other categories)."""


@dataclass
class Measurement:
    """What :func:`measure` found: the COCO evaluation and what produced it.

    ``predictions``: detections by image id (``detr.engine.evaluate``'s contract, every query
    kept; with ``tiled`` the best :data:`COCO_MAX_DETS` merged detections of each whole
    image); ``category_ids``: the category id of each model label (None: labels are the ids).
    ``layer_predictions``: with ``measure(layers=True)`` (and no tiling), the same for every
    decoder layer, the first first and ``predictions`` last (None otherwise). ``params``: the
    checkpoint's ``params`` (``model``, ``data``, ``train``... sections as trained).
    ``raw_predictions``: untiled, every query of the last layer before ``evaluate.nms`` (what
    the model itself draws; ``predictions`` is after it).
    """

    evaluation: CocoEvaluation
    model: torch.nn.Module
    model_cfg: ModelConfig
    val: CocoDetection
    category_ids: list | None
    predictions: dict[int, dict]
    tiled: bool = False
    layer_predictions: list[dict[int, dict]] | None = None
    params: dict | None = None
    raw_predictions: dict[int, dict] | None = None
    tile_size: int | None = None  # with ``tiled``: the tile side in the image's pixels


def measure(checkpoint: Path, dataset_dir: Path, *, cfg: EvaluateConfig, data_cfg: DataConfig,
            train_cfg: TrainConfig, layers: bool = False) -> Measurement:
    """COCOeval of ``checkpoint`` on ``dataset_dir``'s val split (``annotations/val.json`` +
    ``images/val/``). ``layers``: also keep every decoder layer's detections (same forward
    pass).

    Raises:
        FileNotFoundError: no checkpoint file, or no ``annotations/val.json`` under the dataset.
        CheckpointError: the checkpoint is not a readable training checkpoint.
        EvaluationInputError: the checkpoint's categories are not the val split's.
    """
    checkpoint, dataset_dir = Path(checkpoint), Path(dataset_dir)
    _check_inputs(checkpoint, dataset_dir)
    cfg = with_tile(cfg, dataset_dir)
    ckpt = load_file(checkpoint)
    model, model_cfg, label_map = model_from_checkpoint(checkpoint, ckpt=ckpt)
    resize = val_resize(ckpt, checkpoint, data_cfg)
    transforms = make_transforms("val", scales=resize[:1], max_size=resize[1])
    whole = dataset_dir / "annotations" / whole_annotation_name("val")
    if cfg.tile is not None and whole.is_file():
        val = CocoDetection(dataset_dir / "images" / "val", whole, transforms)
    else:
        val = CocoDetection.from_root(dataset_dir, "val", transforms=transforms)
    category_ids = _category_ids(label_map, val, checkpoint)
    raw = None
    if cfg.tile is not None and has_mask_head(model):
        raise ValueError("evaluate.tile: tiled prediction of a segmentation model "
                         f"(model.task: {model_cfg.task}) is not supported; set evaluate.tile: "
                         "null")
    if cfg.tile is None:
        found = _predict(model, val, category_ids, cfg, data_cfg, train_cfg, layers,
                         _mask_outputs(model, model_cfg, val, cfg))
        raw = found[-1]
        if cfg.nms is not None:
            found = [{i: class_wise_nms(d, cfg.nms) for i, d in p.items()} for p in found]
    else:  # merged tiles (each tile's NMS'd by the predictor): no per-layer detections
        found = [_predict_tiled(model, val, category_ids, cfg, resize, train_cfg)]
    return Measurement(evaluate_detections(val.coco, found[-1]), model, model_cfg, val,
                       category_ids, found[-1], cfg.tile is not None,
                       found if layers and cfg.tile is None else None,
                       dict(ckpt.get("params") or {}), raw, _tile_size(cfg, resize))


def with_tile(cfg: EvaluateConfig, dataset_dir: Path) -> EvaluateConfig:
    """``cfg`` with ``tile: auto`` made concrete for ``dataset_dir``: the tiles ``prepare``
    cut it into (``annotations/tiling.json``, written by ``prepare.tile: auto``), predicted
    on whole images; no tiling when it has none."""
    if cfg.tile != "auto":
        return cfg
    record = Path(dataset_dir) / "annotations" / "tiling.json"
    decided = json.loads(record.read_text()) if record.is_file() else {}
    tile = (EvaluateTileConfig(size=int(decided["size"]), overlap=decided.get("overlap", 0.2))
            if decided.get("size") else None)
    return dataclasses.replace(cfg, tile=tile)


def class_labels(evaluation: CocoEvaluation) -> dict[int, str]:
    """A unique display name per category id: its name, or ``<name>_<id>`` where the name
    repeats or is ``all`` (reserved for the mean curve)."""
    counts = Counter(evaluation.category_names.values())
    return {cat: name if counts[name] == 1 and name != ALL else f"{name}_{cat}"
            for cat, name in evaluation.category_names.items()}


def per_class_ap(evaluation: CocoEvaluation) -> dict[str, float | None]:
    """``{class label: AP@[.50:.95] or None (no val object)}``, as ``per_class_ap.json``."""
    labels = class_labels(evaluation)
    return {labels[c]: ap for c, ap in evaluation.per_class_ap.items()}


def _check_inputs(checkpoint: Path, dataset_dir: Path) -> None:
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (run the train stage, or "
                                f"pass --checkpoint)")
    annotations = dataset_dir / "annotations" / "val.json"
    if not annotations.is_file():
        raise FileNotFoundError(f"{dataset_dir}: no val annotations at {annotations} (run the "
                                f"prepare stage, or pass --data)")


def _category_ids(label_map: dict | None, val: CocoDetection, checkpoint: Path) -> list | None:
    """Category id of each model label; None for checkpoints whose labels are the ids."""
    if label_map is None:
        return None
    try:
        ids = category_ids_from_label_map(label_map)
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint}: {exc}") from exc
    if sorted(ids) != sorted(val.label_to_category):
        raise EvaluationInputError(
            f"{checkpoint} was trained on category ids {sorted(ids)}, but {val.ann_file} has "
            f"{sorted(val.label_to_category)}: evaluate it on the dataset it was trained for")
    return ids


def _mask_outputs(model, model_cfg: ModelConfig, val: CocoDetection,
                  cfg: EvaluateConfig) -> MaskOutputs | None:
    """What a segmentation model's evaluation adds (masks; the panoptic map for
    ``model.task: panoptic``, its queries over ``evaluate.panoptic_threshold``), else None."""
    if not has_mask_head(model):
        return None
    stuff = frozenset(int(c["id"]) for c in val.coco.cats.values() if c.get("isthing", 1) == 0)
    return MaskOutputs(panoptic=model_cfg.task == "panoptic", threshold=cfg.panoptic_threshold,
                       stuff_ids=stuff)


def _predict(model, val: CocoDetection, category_ids: list | None, cfg: EvaluateConfig,
             data_cfg: DataConfig, train_cfg: TrainConfig, layers: bool,
             masks: MaskOutputs | None = None) -> list[dict[int, dict]]:
    """Detections by image id (``detr.engine.evaluate``'s contract), every query kept: of
    every decoder layer with ``layers``, else of the last only (a list of one); ``masks``:
    see :func:`detr.engine.evaluate`."""
    device = select_device(train_cfg.device)
    precision = resolve_precision(train_cfg.precision, device)
    model = model.to(device)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(val, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate,
                        num_workers=data_cfg.num_workers, pin_memory=device.type == "cuda")
    run = evaluate_layers if layers else lambda *a, **kw: [evaluate(*a, **kw)]
    return run(model, PostProcess(category_ids).to(device), loader, device=device,
               precision=precision, channels_last=train_cfg.channels_last,
               progress=sys.stderr.isatty(), masks=masks)


def _predict_tiled(model, val: CocoDetection, category_ids: list | None, cfg: EvaluateConfig,
                   resize: tuple[int, int], train_cfg: TrainConfig) -> dict[int, dict]:
    """Detections by image id of ``val``'s whole images, each predicted tile by tile
    (``cfg.tile``), the best :data:`COCO_MAX_DETS` kept, no score threshold."""
    device = select_device(train_cfg.device)
    predictor = Predictor(model, category_ids=category_ids, scale=resize[0],
                          max_size=resize[1], device=str(device),
                          precision=resolve_precision(train_cfg.precision, device),
                          score_threshold=0.0, top_k=COCO_MAX_DETS,
                          channels_last=train_cfg.channels_last, nms=cfg.nms)
    options = tile_options(cfg, predictor)
    predictions = {}
    for image_id in val.ids:
        path = val.image_dir / val.coco.imgs[image_id]["file_name"]
        det = predictor.predict(path, tile=options, batch_size=cfg.batch_size)[0]
        predictions[image_id] = {"boxes": det.boxes, "scores": det.scores,
                                 "labels": det.labels}
    return predictions


def _tile_size(cfg: EvaluateConfig, resize: tuple[int, int]) -> int | None:
    """The tile side ``evaluate.tile`` cuts (``auto``: the val scale, as the predictor's)."""
    if cfg.tile is None:
        return None
    return min(resize) if cfg.tile.size == "auto" else int(cfg.tile.size)


def tile_options(cfg: EvaluateConfig, predictor: Predictor) -> TileOptions:
    """``evaluate.tile`` as the predictor's :class:`TileOptions` (``auto``: its val scale)."""
    tile = cfg.tile
    return predictor.tiling(tile.size, overlap=tile.overlap, whole=tile.whole, match=tile.match,
                            threshold=tile.threshold, fuse=tile.fuse)
