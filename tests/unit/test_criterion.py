import pytest
import torch
from torchvision.ops import box_convert, box_iou

from detr.config import LossConfig, QueryGroupsConfig
from detr.models.aids import QueryGroups
from detr.models.criterion import build_criterion, paired_iou

C = 3


def _target():
    return [{"labels": torch.tensor([0, 2]),
             "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])}]


def _outputs(logits, boxes, aux_layers=0):
    out = {"pred_logits": logits, "pred_boxes": boxes}
    out["aux_outputs"] = [{"pred_logits": logits.clone(), "pred_boxes": boxes.clone()}
                          for _ in range(aux_layers)]
    return out


def test_loss_keys_including_aux():
    criterion = build_criterion(C, LossConfig())
    losses = criterion(_outputs(torch.randn(1, 5, C + 1), torch.rand(1, 5, 4) * 0.5 + 0.2, 2),
                       _target())
    expected = {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"}
    expected |= {f"{k}_{i}" for k in ("loss_ce", "loss_bbox", "loss_giou") for i in (0, 1)}
    assert set(losses) == expected
    # identical aux layers give identical aux losses
    assert torch.allclose(losses["loss_giou_0"], losses["loss_giou"])
    total = criterion.total(losses)
    assert total.item() == pytest.approx(3 * (losses["loss_ce"] + 5 * losses["loss_bbox"]
                                              + 2 * losses["loss_giou"]).item(), rel=1e-5)


def test_loss_decreases_as_predictions_move_toward_targets():
    criterion = build_criterion(C, LossConfig())
    tgt = _target()
    goal = torch.cat([tgt[0]["boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.5]])]).unsqueeze(0)
    start = goal + torch.tensor([0.12, -0.1, 0.05, 0.08])  # each prediction near its own target
    logits = torch.zeros(1, 3, C + 1)
    values = []
    for alpha in (0.0, 0.5, 0.9, 1.0):
        boxes = (1 - alpha) * start + alpha * goal
        values.append(criterion(_outputs(logits, boxes), tgt))
    l1 = [v["loss_bbox"].item() for v in values]
    giou = [v["loss_giou"].item() for v in values]
    assert l1 == sorted(l1, reverse=True) and giou == sorted(giou, reverse=True)
    assert l1[-1] == pytest.approx(0, abs=1e-6) and giou[-1] == pytest.approx(0, abs=1e-5)


def test_box_losses_are_normalised_by_number_of_boxes():
    criterion = build_criterion(C, LossConfig())
    tgt = _target()
    boxes = tgt[0]["boxes"].clone().unsqueeze(0)
    boxes[0, 0, 0] += 0.1  # one box off by 0.1 in cx -> L1 sum 0.1 over 2 boxes
    losses = criterion(_outputs(torch.zeros(1, 2, C + 1), boxes), tgt)
    assert losses["loss_bbox"].item() == pytest.approx(0.05, abs=1e-6)


def test_no_object_weighting():
    """Unmatched queries predicting a class are penalised eos_coef times as much."""
    tgt = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    logits = torch.zeros(1, 2, C + 1)
    logits[0, 0, 0] = 10.0  # the matched query is right and confident
    losses = {}
    for eos in (0.1, 1.0):
        criterion = build_criterion(C, LossConfig(eos_coef=eos))
        losses[eos] = criterion(_outputs(logits, boxes), tgt)["loss_ce"].item()
    ce_unmatched = torch.log(torch.tensor(C + 1.0)).item()  # uniform logits
    ce_matched = torch.nn.functional.cross_entropy(logits[0, :1], torch.tensor([0])).item()
    for eos, value in losses.items():
        assert value == pytest.approx((ce_matched + eos * ce_unmatched) / (1 + eos), rel=1e-5)


def test_cardinality_and_class_error():
    criterion = build_criterion(C, LossConfig())
    tgt = _target()
    logits = torch.full((1, 4, C + 1), -10.0)
    logits[0, :, C] = 10.0  # all "no object"...
    logits[0, 0, 1] = 20.0  # ...but one query predicts class 1
    boxes = torch.cat([tgt[0]["boxes"], torch.rand(2, 4) * 0.1 + 0.1]).unsqueeze(0)
    losses = criterion(_outputs(logits, boxes), tgt)
    assert losses["cardinality_error"].item() == pytest.approx(1.0)  # 1 predicted vs 2
    assert losses["class_error"].item() == pytest.approx(100.0)  # neither matched query right


def test_empty_targets_give_finite_losses_and_gradients():
    criterion = build_criterion(C, LossConfig())
    boxes = torch.rand(2, 4, 4, requires_grad=True)
    logits = torch.randn(2, 4, C + 1, requires_grad=True)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = criterion(_outputs(logits, boxes, 1), empty)
    total = criterion.total(losses)
    total.backward()
    assert torch.isfinite(total) and losses["loss_bbox"].item() == 0
    assert torch.isfinite(logits.grad).all()


def test_query_groups_are_matched_separately_and_summed():
    """Two identical groups give twice one group's losses; the groups' queries may both
    predict the same target (one-to-many across groups)."""
    groups = QueryGroups(QueryGroupsConfig(groups=2), dim=8, num_queries=4)
    criterion = build_criterion(C, LossConfig(), [groups])
    tgt = _target()
    logits, boxes = torch.randn(1, 4, C + 1), torch.rand(1, 4, 4) * 0.5 + 0.2
    single = criterion(_outputs(logits, boxes, 1), tgt)
    doubled = _outputs(torch.cat([logits, logits], 1), torch.cat([boxes, boxes], 1), 1)
    doubled["query_groups"] = 2
    grouped = criterion(doubled, tgt)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_giou_0"):
        assert grouped[key].item() == pytest.approx(2 * single[key].item(), rel=1e-5)
    assert grouped["class_error"].item() == pytest.approx(single["class_error"].item())
    # a criterion without the aid refuses its outputs rather than missing its losses
    with pytest.raises(ValueError, match=r"training aid\(s\) \['query_groups'\]"):
        build_criterion(C, LossConfig())(doubled, tgt)


def test_paired_iou_is_the_diagonal_of_box_iou_and_zero_for_empty_boxes():
    a = box_convert(torch.rand(7, 4) * 0.5 + 0.1, "cxcywh", "xyxy")
    b = box_convert(torch.rand(7, 4) * 0.5 + 0.1, "cxcywh", "xyxy")
    assert torch.allclose(paired_iou(a, b), box_iou(a, b).diagonal(), atol=1e-6)
    point = torch.tensor([[0.2, 0.2, 0.2, 0.2]])
    assert paired_iou(point, point).tolist() == [0.0]


def test_iou_aware_class_target_splits_a_matched_query_by_its_iou():
    """One target; query 0 is matched with IoU 0.6 (shifted by a quarter of its width)."""
    tgt = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    boxes = torch.tensor([[[0.55, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]], requires_grad=True)
    logits = torch.randn(1, 2, C + 1, requires_grad=True)
    plain = build_criterion(C, LossConfig())(_outputs(logits, boxes), tgt)["loss_ce"]
    aware = build_criterion(C, LossConfig(iou_aware=True))(_outputs(logits, boxes), tgt)
    log_p = logits[0].detach().log_softmax(-1)
    matched = -(0.6 * log_p[0, 1] + 0.4 * log_p[0, C])
    unmatched = -0.1 * log_p[1, C]  # eos_coef 0.1, target "no object" as before
    assert aware["loss_ce"].item() == pytest.approx(((matched + unmatched) / 1.1).item(), rel=1e-5)
    assert aware["loss_ce"].item() != pytest.approx(plain.item(), rel=1e-3)
    aware["loss_ce"].backward()
    assert logits.grad is not None
    assert boxes.grad is None or not boxes.grad.any()  # the IoU is a target, not a path


def test_iou_aware_equals_the_plain_loss_for_perfect_boxes():
    tgt = _target()
    boxes = torch.cat([tgt[0]["boxes"], torch.tensor([[0.5, 0.5, 0.1, 0.1]])])[None]
    logits = torch.randn(1, 3, C + 1)
    out = _outputs(logits, boxes, aux_layers=1)
    plain = build_criterion(C, LossConfig())(out, tgt)
    aware = build_criterion(C, LossConfig(iou_aware=True))(out, tgt)
    for key in ("loss_ce", "loss_ce_0"):
        assert aware[key].item() == pytest.approx(plain[key].item(), rel=1e-5)
