"""Entry points in the style of the official torch-hub ones (``detr_resnet50`` ...).

They always build the official architecture (frozen BatchNorm, sine encoding, 6+6 layers,
d=256, 100 queries), so the official checkpoints load into them strictly. ``pretrained`` is
False (random init), True (the official COCO checkpoint by URL, hash-checked) or a path/URL.
With ``num_classes`` other than 91, pretrained weights are loaded for fine-tuning: every tensor
but the class head, which is re-initialised (the report is in ``model.load_report``).
The ``*_panoptic`` ones build the segmentation model (:class:`DETRsegm`, 250 classes as the
official COCO panoptic checkpoints, which they load strictly).

Also the builders that read files for the model: :func:`build` (a config whose
``backbone_weights`` is a file) and :func:`model_from_checkpoint` (a training checkpoint), and
:func:`load_detector_weights` (a box model's weights into a segmentation model too).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor

from detr.checkpoint import (
    CheckpointError,
    LoadReport,
    load_file,
    load_state_dict_file,
    load_weights,
)
from detr.config import ConfigError, ModelConfig, load_section, migrate_params
from detr.models.detr import DETR, build_model
from detr.models.segmentation import MASK_HEAD_PREFIXES, DETRsegm

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/detr/"
OFFICIAL_CHECKPOINTS = {
    ("resnet50", False): "detr-r50-e632da11.pth",
    ("resnet50", True): "detr-r50-dc5-f0fb7ef5.pth",
    ("resnet101", False): "detr-r101-2c7b67e5.pth",
    ("resnet101", True): "detr-r101-dc5-a2e86def.pth",
}
# The official panoptic models (DETRsegm: the box model under "detr.", then the mask head).
OFFICIAL_PANOPTIC_CHECKPOINTS = {
    ("resnet50", False): "detr-r50-panoptic-00ce5173.pth",
    ("resnet50", True): "detr-r50-dc5-panoptic-da08f1b1.pth",
    ("resnet101", False): "detr-r101-panoptic-40021d53.pth",
}
COCO_NUM_CLASSES = 91  # the official checkpoints' max category id + 1
COCO_PANOPTIC_NUM_CLASSES = 250  # the official panoptic models' (max category id 200, rounded up)


def _official(backbone: str, dilation: bool, pretrained: bool | str | Path, num_classes: int,
              overrides: dict) -> DETR | DETRsegm:
    base = dataclasses.asdict(ModelConfig(backbone=backbone, dilation=dilation,
                                          num_classes=num_classes))
    cfg = load_section(ModelConfig, {**base, **overrides}, f"detr_{backbone}")
    model = build(cfg)
    if pretrained is False:
        return model
    files, classes = ((OFFICIAL_PANOPTIC_CHECKPOINTS, COCO_PANOPTIC_NUM_CLASSES)
                      if cfg.task != "detection"
                      else (OFFICIAL_CHECKPOINTS, COCO_NUM_CLASSES))
    source = OFFICIAL_BASE_URL + files[(backbone, dilation)] if pretrained is True else pretrained
    model.load_report = load_weights(model, load_state_dict_file(source),
                                     finetune=num_classes != classes)
    return model


def detr_resnet50(pretrained: bool | str | Path = False, num_classes: int = 91,
                  **overrides) -> DETR:
    """DETR R50 (42.0 AP on COCO val with the official weights)."""
    return _official("resnet50", False, pretrained, num_classes, overrides)


def detr_resnet50_dc5(pretrained: bool | str | Path = False, num_classes: int = 91,
                      **overrides) -> DETR:
    """DETR R50 with a dilated last stage (43.3 AP)."""
    return _official("resnet50", True, pretrained, num_classes, overrides)


def detr_resnet101(pretrained: bool | str | Path = False, num_classes: int = 91,
                   **overrides) -> DETR:
    """DETR R101 (43.5 AP)."""
    return _official("resnet101", False, pretrained, num_classes, overrides)


def detr_resnet101_dc5(pretrained: bool | str | Path = False, num_classes: int = 91,
                       **overrides) -> DETR:
    """DETR R101 with a dilated last stage (44.9 AP)."""
    return _official("resnet101", True, pretrained, num_classes, overrides)


def detr_resnet50_panoptic(pretrained: bool | str | Path = False,
                           num_classes: int = COCO_PANOPTIC_NUM_CLASSES,
                           **overrides) -> DETRsegm:
    """DETR R50 with the mask head, COCO panoptic (official weights: PQ 43.4, mask AP
    31.1, box AP 38.8). ``overrides``: other ``model:`` keys (``task`` defaults to panoptic)."""
    return _official("resnet50", False, pretrained, num_classes, _panoptic(overrides))


def detr_resnet50_dc5_panoptic(pretrained: bool | str | Path = False,
                               num_classes: int = COCO_PANOPTIC_NUM_CLASSES,
                               **overrides) -> DETRsegm:
    """DETR R50-DC5 with the mask head, COCO panoptic (PQ 44.6, mask AP 31.9)."""
    return _official("resnet50", True, pretrained, num_classes, _panoptic(overrides))


def detr_resnet101_panoptic(pretrained: bool | str | Path = False,
                            num_classes: int = COCO_PANOPTIC_NUM_CLASSES,
                            **overrides) -> DETRsegm:
    """DETR R101 with the mask head, COCO panoptic (PQ 45.1, mask AP 33.0)."""
    return _official("resnet101", False, pretrained, num_classes, _panoptic(overrides))


def _panoptic(overrides: dict) -> dict:
    return {"task": "panoptic", **overrides}


def build(cfg: ModelConfig) -> DETR | DETRsegm:
    """:func:`~detr.models.detr.build_model`, reading ``cfg.backbone_weights`` when it is a
    file (a torchvision ResNet state dict, or a checkpoint with one under ``model``)."""
    path = cfg.backbone_weights
    if path in (None, "imagenet"):
        return build_model(cfg)
    try:
        return build_model(cfg, backbone_state=load_state_dict_file(path))
    except ValueError as exc:  # the file holds another network
        raise CheckpointError(f"{path}: {exc}") from None


def load_detector_weights(model: DETR | DETRsegm, state: dict[str, Tensor], *,
                          finetune: bool = False) -> LoadReport:
    """:func:`~detr.checkpoint.load_weights`, and a box model's weights into a segmentation
    model: a state dict without ``detr.*`` keys (a detector's, e.g. a ``model.task:
    detection`` training's or the official ``detr-r50``) goes under ``detr.``, and the mask
    head (``bbox_attention.*``, ``mask_head.*``) keeps its fresh initialisation, reported as
    skipped. For fine-tuning a trained detector to segmentation (``train.init_weights``)."""
    if not isinstance(model, DETRsegm) or any(k.startswith("detr.") for k in state):
        return load_weights(model, state, finetune=finetune)
    own = model.state_dict()
    fresh = [k for k in own if k.startswith(MASK_HEAD_PREFIXES)]
    state = {**{f"detr.{k}": v for k, v in state.items()}, **{k: own[k] for k in fresh}}
    report = load_weights(model, state, finetune=finetune)
    report.loaded = [k for k in report.loaded if k not in fresh]
    report.skipped.update(dict.fromkeys(fresh, "not in the box checkpoint (mask head starts "
                                               "fresh)"))
    return report


def model_from_checkpoint(path: str | Path, *, map_location: str = "cpu", ckpt: dict | None = None
                          ) -> tuple[DETR | DETRsegm, ModelConfig, dict | None]:
    """Rebuild the trained model of a training checkpoint (``params`` + ``model``).

    Returns ``(model, model_cfg, label_map)``; the model is in eval mode on the CPU.
    ``label_map`` is ``{"categories": [{"id", "name"}, ...]}`` in label order (None for a
    checkpoint without one, e.g. the official COCO ones, whose labels are category ids).
    ``ckpt``: the checkpoint already read from ``path`` (it is then not read again). Params
    in the layout before ``model.aids`` are migrated (:func:`detr.config.migrate_params`).
    """
    if ckpt is None:
        ckpt = load_file(path, map_location=map_location)
    if "model" not in ckpt or "params" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint (needs 'model' and 'params')")
    try:
        params = migrate_params(dict(ckpt["params"]))
        cfg = load_section(ModelConfig, dict(params["model"]), "params.model")
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unusable model params: {exc}") from exc
    # Weights come from the checkpoint: don't fetch or read backbone weights again.
    cfg = dataclasses.replace(cfg, backbone_weights=None)
    model = build_model(cfg)
    try:
        load_weights(model, ckpt["model"])
    except CheckpointError as exc:  # its params describe another model than its weights
        raise CheckpointError(f"{path}: {exc}") from None
    return model.eval(), cfg, ckpt.get("label_map")


def val_resize(ckpt: dict, path: str | Path, fallback: Any = None) -> tuple[int, int]:
    """``(scale, max_size)``: the val resize (short side, long-side cap) a training checkpoint
    was trained for, ``max(params.data.scales)`` and ``params.data.max_size``; for a
    checkpoint without them (official weights), ``fallback``'s (a DataConfig).

    Raises:
        CheckpointError: neither gives concrete sizes (``auto`` is not a size).
    """
    for data in ((ckpt.get("params") or {}).get("data") or {}, fallback):
        scales = data.get("scales") if isinstance(data, dict) else getattr(data, "scales", None)
        size = data.get("max_size") if isinstance(data, dict) else getattr(data, "max_size", None)
        if isinstance(scales, list | tuple) and scales and isinstance(size, int):
            return int(max(scales)), int(size)
    raise CheckpointError(f"{path}: no val resize in its params.data (scales, max_size) and "
                          f"none given: set data.scales and data.max_size to numbers")
