"""Entry points in the style of the official torch-hub ones (``detr_resnet50`` ...).

They always build the official architecture (frozen BatchNorm, sine encoding, 6+6 layers,
d=256, 100 queries), so the official checkpoints load into them strictly. ``pretrained`` is
False (random init), True (the official COCO checkpoint by URL, hash-checked) or a path/URL.
With ``num_classes`` other than 91, pretrained weights are loaded for fine-tuning: every tensor
but the class head, which is re-initialised (the report is in ``model.load_report``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from detr.checkpoint import load_state_dict_file, load_weights
from detr.config import ModelConfig, load_section
from detr.models.detr import DETR, build_model

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/detr/"
OFFICIAL_CHECKPOINTS = {
    ("resnet50", False): "detr-r50-e632da11.pth",
    ("resnet50", True): "detr-r50-dc5-f0fb7ef5.pth",
    ("resnet101", False): "detr-r101-2c7b67e5.pth",
    ("resnet101", True): "detr-r101-dc5-a2e86def.pth",
}
COCO_NUM_CLASSES = 91  # the official checkpoints' max category id + 1


def _official(backbone: str, dilation: bool, pretrained: bool | str | Path, num_classes: int,
              overrides: dict) -> DETR:
    base = dataclasses.asdict(ModelConfig(backbone=backbone, dilation=dilation,
                                          num_classes=num_classes))
    cfg = load_section(ModelConfig, {**base, **overrides}, f"detr_{backbone}")
    model = build_model(cfg)
    if pretrained is False:
        return model
    source = (OFFICIAL_BASE_URL + OFFICIAL_CHECKPOINTS[(backbone, dilation)]
              if pretrained is True else pretrained)
    model.load_report = load_weights(model, load_state_dict_file(source),
                                     finetune=num_classes != COCO_NUM_CLASSES)
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
