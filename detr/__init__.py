"""DETR: a PyTorch library to build, train, evaluate and run DEtection TRansformers.

Public API::

    import detr
    model = detr.detr_resnet50(pretrained=False, num_classes=91)   # official architecture
    model = detr.build_model(cfg)                                  # from a ModelConfig
"""

from detr.config import LossConfig, ModelConfig
from detr.hub import detr_resnet50, detr_resnet50_dc5, detr_resnet101, detr_resnet101_dc5
from detr.models import (
    DETR,
    HungarianMatcher,
    PostProcess,
    SetCriterion,
    build_criterion,
    build_model,
)

__all__ = [
    "DETR", "HungarianMatcher", "LossConfig", "ModelConfig", "PostProcess", "SetCriterion",
    "build_criterion", "build_model", "detr_resnet50", "detr_resnet50_dc5", "detr_resnet101",
    "detr_resnet101_dc5",
]
