"""The dense auxiliary head (model.aids.dense): per-token targets, training-only output, loss."""

import dataclasses

import pytest
import torch
from torchvision.ops import box_convert

from detr.checkpoint import load_weights
from detr.config import AidsConfig, ConfigError, DenseConfig, LossConfig, load_section
from detr.models.aids.dense import DenseHead, cell_centres, dense_assignment, dense_targets
from detr.models.criterion import build_criterion
from detr.models.detr import build_model

NO_AIDS = AidsConfig()


def _dense(cfg, **kwargs):
    return dataclasses.replace(cfg, aids=AidsConfig(dense=DenseConfig(**kwargs)))


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


def _two_images() -> tuple[list, list]:
    """Two images of different sizes: one with two boxes (one small), one with none."""
    images = [torch.randn(3, 64, 96), torch.randn(3, 96, 64)]
    targets = [{"labels": torch.tensor([1, 3]),
                "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.6], [0.2, 0.2, 0.1, 0.1]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return images, targets


def test_dense_head_is_training_only_and_its_loss_reaches_the_backbone(tiny_cfg):
    torch.manual_seed(0)
    cfg = _dense(dataclasses.replace(tiny_cfg, num_classes=4), loss_coef=2.0)
    model = build_model(cfg)
    images, targets = _two_images()
    out = model.train()(images)
    h, w = out["dense"]["mask"].shape[-2:]
    assert out["dense"]["pred_logits"].shape == (2, h * w, 5)
    criterion = build_criterion(4, LossConfig(), model.aids)
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
    plain = build_model(dataclasses.replace(cfg, aids=NO_AIDS)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("dense_embed")}
    plain.load_state_dict(state)
    with torch.no_grad():
        a, b = model(images), plain(images)
    assert "dense" not in a
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])
    assert torch.equal(a["pred_logits"], b["pred_logits"])


def test_finetuning_to_other_classes_starts_the_dense_head_fresh(tiny_cfg):
    trained = build_model(_dense(dataclasses.replace(tiny_cfg, num_classes=4)))
    model = build_model(_dense(dataclasses.replace(tiny_cfg, num_classes=6)))
    report = load_weights(model, trained.state_dict(), finetune=True)
    assert sorted(report.skipped) == ["class_embed.bias", "class_embed.weight",
                                      "dense_embed.bias", "dense_embed.weight"]


def test_dense_assignment_names_the_box_and_the_classes_follow_it():
    valid = torch.ones(4, 4, dtype=torch.bool)
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    box = dense_assignment(boxes, valid).view(4, 4)
    assert box.tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert dense_targets(boxes, torch.tensor([2, 0]), valid, 3).view(4, 4).tolist() == [
        [2, 2, 2, 2], [2, 0, 0, 2], [2, 0, 0, 2], [2, 2, 2, 2]]
    assert (dense_assignment(torch.zeros(0, 4), valid) == -1).all()


def _dense_outputs(ltrb: torch.Tensor, valid: torch.Tensor, num_classes: int) -> dict:
    tokens = valid.numel()
    return {"pred_logits": torch.zeros(1, tokens, num_classes + 1), "mask": ~valid[None],
            "pred_ltrb": ltrb[None]}


def test_dense_box_loss_is_zero_for_exact_distances_and_grows_with_error():
    valid = torch.zeros(4, 6, dtype=torch.bool)
    valid[:, :4] = True  # a 4x4-cell image padded to 6 columns
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.125, 0.125, 0.25, 0.25]])
    target = [{"boxes": boxes, "labels": torch.tensor([0, 1])}]
    box = dense_assignment(boxes, valid)
    cx, cy = cell_centres(valid)
    x0, y0, x1, y1 = box_convert(boxes, "cxcywh", "xyxy").unbind(-1)
    exact = torch.full((24, 4), 0.5)
    on = box >= 0
    b = box[on]
    exact[on] = torch.stack([cx[on] - x0[b], cy[on] - y0[b], x1[b] - cx[on], y1[b] - cy[on]], -1)
    head = DenseHead(DenseConfig(boxes=True), num_classes=2, dim=8)
    criterion = build_criterion(2, LossConfig(), [head])

    def dense_losses(ltrb):
        return head.losses({"dense": _dense_outputs(ltrb, valid, 2)}, target,
                           num_boxes=torch.tensor(2.0), empty_weight=criterion.empty_weight)

    losses = dense_losses(exact)
    assert losses["loss_bbox_dense"] < 1e-6 and losses["loss_giou_dense"] < 1e-6
    # Only assigned tokens count: the padding and unassigned tokens' predictions are ignored.
    other = exact.clone()
    other[~on] = 0.9
    assert dense_losses(other)["loss_bbox_dense"] < 1e-6
    # Every assigned token's box 0.1 too wide on the left: L1 (cxcywh) = 0.05 + 0.1 per token.
    wider = exact.clone()
    wider[on, 0] += 0.1
    shifted = dense_losses(wider)
    assert torch.isclose(shifted["loss_bbox_dense"], torch.tensor(0.15))
    assert shifted["loss_giou_dense"] > 0.05


def test_dense_boxes_train_the_backbone_and_leave_inference_alone(tiny_cfg):
    torch.manual_seed(0)
    cfg = _dense(dataclasses.replace(tiny_cfg, num_classes=4), boxes=True)
    model = build_model(cfg)
    images, targets = _two_images()
    out = model.train()(images)
    assert out["dense"]["pred_ltrb"].shape == (*out["dense"]["pred_logits"].shape[:2], 4)
    criterion = build_criterion(4, LossConfig(), model.aids)
    losses = criterion(out, targets)
    model.zero_grad()
    (losses["loss_bbox_dense"] + losses["loss_giou_dense"]).backward()
    grad = model.backbone[0].body.layer1[0].conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.class_embed.weight.grad is None  # the box terms reach the encoder, not heads
    rest = {k: v for k, v in losses.items() if not k.endswith(("bbox_dense", "giou_dense"))}
    assert torch.allclose(criterion.total(losses) - criterion.total(rest),
                          5.0 * losses["loss_bbox_dense"] + 2.0 * losses["loss_giou_dense"])
    # No targets in the batch: the box terms are zero, not NaN.
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    none = criterion(model(images), empty)
    assert none["loss_bbox_dense"] == 0 and none["loss_giou_dense"] == 0
    # Inference: no dense output; a plain model loads the weights with the head reported.
    model.eval()
    plain = build_model(dataclasses.replace(cfg, aids=NO_AIDS)).eval()
    report = load_weights(plain, model.state_dict())
    assert {k for k in report.skipped if k.startswith("dense_bbox_embed.")}
    with torch.no_grad():
        assert "dense" not in model(images)
        assert torch.equal(model(images)["pred_boxes"], plain(images)["pred_boxes"])


def test_dense_section_is_validated_where_it_is_read():
    cfg = load_section(AidsConfig, {"dense": {"boxes": True}}, "model.aids")
    assert cfg.dense == DenseConfig(boxes=True, loss_coef=1.0) and cfg.query_groups is None
    assert load_section(AidsConfig, {"dense": {}}, "model.aids").dense == DenseConfig()
    with pytest.raises(ConfigError, match=r"model\.aids\.dense\.loss_coef: -1.0 must be >= 0"):
        load_section(AidsConfig, {"dense": {"loss_coef": -1}}, "model.aids")
    with pytest.raises(ConfigError, match=r"model\.aids\.dense\.loss_coef: expected float"):
        load_section(AidsConfig, {"dense": {"loss_coef": "x"}}, "model.aids")
