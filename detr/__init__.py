"""DETR: a PyTorch library to build, train, evaluate and run DEtection TRansformers.

Public API::

    import detr
    model = detr.detr_resnet50(pretrained=False, num_classes=91)   # official architecture
    model = detr.build_model(cfg)                                  # from a ModelConfig

The names below load on first use, so importing a light submodule (``detr.data.layout``, read
by the validation's worker processes) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LossConfig": "detr.config", "ModelConfig": "detr.config",
    "detr_resnet50": "detr.hub", "detr_resnet50_dc5": "detr.hub",
    "detr_resnet101": "detr.hub", "detr_resnet101_dc5": "detr.hub",
    "detr_resnet50_panoptic": "detr.hub", "detr_resnet50_dc5_panoptic": "detr.hub",
    "detr_resnet101_panoptic": "detr.hub",
    "model_from_checkpoint": "detr.hub",
    "DETR": "detr.models", "DETRsegm": "detr.models", "HungarianMatcher": "detr.models", "PostProcess": "detr.models",
    "SetCriterion": "detr.models", "build_criterion": "detr.models", "build_model": "detr.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'detr' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
