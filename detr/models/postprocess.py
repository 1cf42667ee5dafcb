"""DETR outputs -> detections in absolute pixels, with category ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert


class PostProcess(nn.Module):
    """Turn model outputs into one detection dict per image.

    Args:
        label_to_category: category id of each contiguous label (None: labels are category ids,
            as in the official COCO checkpoints).

    ``forward(outputs, target_sizes)``, ``target_sizes`` [B, 2] = (height, width) of the
    original images, returns per image ``scores`` [Q], ``labels`` [Q] (category ids) and
    ``boxes`` [Q, 4] absolute xyxy pixels; every query is kept, ranked by nothing: apply a score
    threshold or top-k downstream.
    """

    def __init__(self, label_to_category: Sequence[int] | None = None):
        super().__init__()
        mapping = None if label_to_category is None else torch.as_tensor(list(label_to_category))
        self.register_buffer("label_to_category", mapping, persistent=False)

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if len(target_sizes) != len(logits):
            raise ValueError(f"target_sizes has {len(target_sizes)} rows for {len(logits)} images")
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        if self.label_to_category is not None:
            labels = self.label_to_category[labels]
        h, w = target_sizes.to(boxes).unbind(1)
        scale = torch.stack([w, h, w, h], dim=1)[:, None, :]
        boxes = box_convert(boxes, "cxcywh", "xyxy") * scale
        return [{"scores": s, "labels": lab, "boxes": b}
                for s, lab, b in zip(scores, labels, boxes, strict=True)]
