"""A model trained with horizontal-flip augmentation predicts mirrored boxes on a mirrored image."""

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from detr.config import LossConfig
from detr.models.criterion import build_criterion
from detr.models.detr import build_model
from tests.model.test_overfit import _few_images


def _flip(images, targets):
    boxes = [t["boxes"].clone() for t in targets]
    for b in boxes:
        b[:, 0] = 1 - b[:, 0]  # cx -> 1 - cx in normalised cxcywh
    return images.flip(-1), [{**t, "boxes": b} for t, b in zip(targets, boxes, strict=True)]


@pytest.mark.slow
def test_predictions_on_a_mirrored_image_are_mirrored(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    criterion = build_criterion(tiny_cfg.num_classes, LossConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    images, targets = _few_images()
    g = torch.Generator().manual_seed(1)
    for _ in range(250):
        batch = _flip(images, targets) if torch.rand((), generator=g) < 0.5 else (images, targets)
        loss = criterion.total(criterion(model(batch[0]), batch[1]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
    model.eval()
    with torch.no_grad():
        plain, mirrored = model(images), model(images.flip(-1))
    for i, target in enumerate(targets):
        for out in (plain, mirrored):  # both see every object, confidently
            assert (out["pred_logits"][i].softmax(-1)[:, :-1].max(-1).values > 0.5).sum() \
                >= len(target["boxes"])
        a = _confident_boxes(plain, i)
        b = _confident_boxes(mirrored, i)
        b[:, [0, 2]] = 1 - b[:, [2, 0]]  # mirror back (xyxy)
        iou = box_iou(a, b)
        # every box has its mirror image, matched as COCO matches (IoU > 0.5). Measured on a
        # Xeon with AMX: trained with flips 0.63-0.98 (0.7 failed there, 0.63 on one image);
        # the same 250 steps without flips: 0.00-0.29 on the worst box of each image.
        assert (iou.max(1).values > 0.5).all(), iou


def _confident_boxes(out, i, threshold=0.5):
    keep = out["pred_logits"][i].softmax(-1)[:, :-1].max(-1).values > threshold
    return box_convert(out["pred_boxes"][i][keep], "cxcywh", "xyxy")
