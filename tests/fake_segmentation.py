"""A stand-in segmentation DETR for prediction tests: a tiny real DETR plus a ``mask_head``
that adds ``pred_masks`` [B, Q, ceil(H/4), ceil(W/4)] logits on the padded batch's stride-4
grid (the segmentation model's output contract, detr/masks_out.py), so masks flow end to end
through Predictor, CLI, ONNX export and the pyfunc without the real mask head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detr.models.detr import build_model
from detr.models.padding import pad_images
from tests.conftest import TINY


class FakeSegmentation(nn.Module):
    """``detr`` (a DETR) and ``mask_head``: a 1x1 conv from the stride-4 mean of the pixels
    to one logit map per query (so a query's mask follows the image's colours)."""

    def __init__(self, detr: nn.Module):
        super().__init__()
        self.detr = detr
        self.num_classes, self.num_queries = detr.num_classes, detr.num_queries
        self.mask_head = nn.Conv2d(3, detr.num_queries, 1)
        with torch.no_grad():  # distinct, clearly signed maps: some pixels in, some out
            self.mask_head.weight.copy_(torch.linspace(-2, 2, 3 * detr.num_queries)
                                        .reshape(detr.num_queries, 3, 1, 1))
            self.mask_head.bias.copy_(torch.linspace(-0.5, 0.5, detr.num_queries))

    def forward(self, images: Tensor | Sequence[Tensor], mask: Tensor | None = None,
                targets=None, *, padded: bool | None = None) -> dict:
        if mask is None:
            images, mask = pad_images(images)
        out = dict(self.detr(images, mask, padded=padded))
        grid = F.avg_pool2d(images, kernel_size=4, stride=4, ceil_mode=True)
        out["pred_masks"] = self.mask_head(grid)
        return out


def fake_segmentation(seed: int = 0) -> FakeSegmentation:
    """The fake around a freshly initialised tiny DETR (:data:`tests.conftest.TINY`)."""
    torch.manual_seed(seed)
    return FakeSegmentation(build_model(TINY)).eval()
