"""DETR's modules: backbone, positional encoding, transformer, heads, matcher, loss."""

from detr.models.criterion import SetCriterion, build_criterion
from detr.models.detr import DETR, build_model
from detr.models.matcher import HungarianMatcher
from detr.models.postprocess import PostProcess
from detr.models.segmentation import DETRsegm

__all__ = ["DETR", "DETRsegm", "HungarianMatcher", "PostProcess", "SetCriterion", "build_criterion",
           "build_model"]
