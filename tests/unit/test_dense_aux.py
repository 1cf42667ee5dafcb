"""The dense auxiliary head (model.dense_aux): per-token targets, training-only output, loss."""

import dataclasses

import torch

from detr.checkpoint import load_weights
from detr.config import LossConfig
from detr.models.criterion import build_criterion, dense_targets
from detr.models.detr import build_model


def test_dense_targets_smallest_box_wins_and_tiny_boxes_keep_their_centre_cell():
    valid = torch.zeros(4, 6, dtype=torch.bool)
    valid[:, :4] = True  # a 4x4-cell image padded to 6 columns
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0],      # the whole image
                          [0.125, 0.125, 0.05, 0.05],  # inside cell (0, 0), no centre in it
                          [0.5, 0.5, 0.5, 0.5]])     # the middle 2x2 cells
    classes = dense_targets(boxes, torch.tensor([0, 1, 2]), valid, num_classes=3).view(4, 6)
    assert classes.tolist() == [[1, 0, 0, 0, 3, 3],
                                [0, 2, 2, 0, 3, 3],
                                [0, 2, 2, 0, 3, 3],
                                [0, 0, 0, 0, 3, 3]]
    empty = dense_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), valid, 3)
    assert empty.tolist() == [3] * 24


def test_dense_head_is_training_only_and_its_loss_reaches_the_backbone(tiny_cfg):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg, num_classes=4, dense_aux=True)
    model = build_model(cfg)
    images = [torch.randn(3, 64, 96), torch.randn(3, 96, 64)]
    targets = [{"labels": torch.tensor([1, 3]),
                "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.6], [0.2, 0.2, 0.1, 0.1]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    out = model.train()(images)
    h, w = out["dense"]["mask"].shape[-2:]
    assert out["dense"]["pred_logits"].shape == (2, h * w, 5)
    criterion = build_criterion(4, dataclasses.replace(LossConfig(), dense_loss_coef=2.0))
    losses = criterion(out, targets)
    assert torch.isfinite(losses["loss_ce_dense"])
    model.zero_grad()
    (2.0 * losses["loss_ce_dense"]).backward()
    grad = model.backbone[0].body.layer1[0].conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # The total counts it with its coefficient.
    rest = {k: v for k, v in losses.items() if k != "loss_ce_dense"}
    assert torch.allclose(criterion.total(losses) - criterion.total(rest),
                          2.0 * losses["loss_ce_dense"])
    # Inference: no dense output, and the same predictions as the model without the head.
    model.eval()
    plain = build_model(dataclasses.replace(cfg, dense_aux=False)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("dense_embed")}
    plain.load_state_dict(state)
    with torch.no_grad():
        a, b = model(images), plain(images)
    assert "dense" not in a
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])
    assert torch.equal(a["pred_logits"], b["pred_logits"])


def test_finetuning_to_other_classes_starts_the_dense_head_fresh(tiny_cfg):
    trained = build_model(dataclasses.replace(tiny_cfg, num_classes=4, dense_aux=True))
    model = build_model(dataclasses.replace(tiny_cfg, num_classes=6, dense_aux=True))
    report = load_weights(model, trained.state_dict(), finetune=True)
    assert sorted(report.skipped) == ["class_embed.bias", "class_embed.weight",
                                      "dense_embed.bias", "dense_embed.weight"]
