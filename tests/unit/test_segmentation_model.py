"""The segmentation model (DETR + the paper's mask head): shapes, padding, frozen detector, aids."""

import dataclasses

import pytest
import torch

from detr.config import ConfigError, LossConfig, ModelConfig, load_section
from detr.models.criterion import build_criterion
from detr.models.detr import DETR, build_model
from detr.models.segmentation import DETRsegm, fpn_stages
from tests.conftest import TINY, with_aids

SEGM = dataclasses.replace(TINY, task="segmentation")


def _targets(sizes):
    """One box + mask per image, in each image's own pixels."""
    targets = []
    for h, w in sizes:
        masks = torch.zeros(1, h, w, dtype=torch.bool)
        masks[0, h // 4: h // 2, w // 4: w // 2] = True
        targets.append({"labels": torch.tensor([1]),
                        "boxes": torch.tensor([[3 / 8, 3 / 8, 1 / 4, 1 / 4]]), "masks": masks})
    return targets


def test_outputs_masks_per_object_query_at_stride_4():
    model = build_model(SEGM).eval()
    assert isinstance(model, DETRsegm) and isinstance(model.detr, DETR)
    out = model([torch.randn(3, 64, 80), torch.randn(3, 50, 61)])
    assert out["pred_logits"].shape == (2, 8, 6) and out["pred_boxes"].shape == (2, 8, 4)
    assert out["pred_masks"].shape == (2, 8, 16, 20)
    assert all(set(aux) == {"pred_logits", "pred_boxes"} for aux in out["aux_outputs"])
    lazy = model([torch.randn(3, 64, 80)], lazy_masks=True)["query_masks"]
    assert lazy.grid == (16, 20) and lazy(torch.tensor([0]), torch.tensor([2])).shape == (1, 16, 20)


@pytest.mark.parametrize("last_stage", ["layer2", "layer3"])
def test_an_earlier_last_stage_stands_in_for_the_missing_levels(last_stage):
    model = build_model(dataclasses.replace(SEGM, last_stage=last_stage)).eval()
    assert model.fpn_levels == fpn_stages(last_stage)
    assert model([torch.randn(3, 64, 96)])["pred_masks"].shape == (1, 8, 16, 24)


def test_detection_is_unchanged_by_the_task_switch():
    torch.manual_seed(1)
    box = build_model(TINY)
    torch.manual_seed(1)
    segm = build_model(SEGM)
    assert {f"detr.{k}" for k in box.state_dict()} == {
        k for k in segm.state_dict() if k.startswith("detr.")}
    for k, v in box.state_dict().items():  # the detector draws the same initial weights
        assert torch.equal(v, segm.state_dict()[f"detr.{k}"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = box.eval()(x), segm.eval()(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"])


def test_masks_of_an_image_do_not_depend_on_its_batch():
    torch.manual_seed(0)
    model = build_model(SEGM).eval()
    small, large = torch.randn(3, 45, 70), torch.randn(3, 96, 128)
    with torch.no_grad():
        alone = model([small])
        batch = model([small, large])
    rows, cols = alone["pred_masks"].shape[-2:]
    assert (rows, cols) == (12, 18)
    torch.testing.assert_close(batch["pred_masks"][0, :, :rows, :cols], alone["pred_masks"][0],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch["pred_logits"][0], alone["pred_logits"][0],
                               atol=1e-4, rtol=1e-4)


def test_mask_head_only_trains_only_the_mask_head():
    cfg = with_aids(dataclasses.replace(SEGM, mask_head_only=True), query_groups=2)
    model = build_model(cfg)
    assert model.aids == []  # aids would train the frozen detector: none built
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("bbox_attention.", "mask_head.")) for n in trainable)
    model.train()
    assert model.training and model.mask_head.training and not model.detr.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    criterion = build_criterion(5, LossConfig(), model.aids)
    images = [torch.randn(3, 64, 64), torch.randn(3, 48, 64)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    criterion.total(criterion(model(images), _targets([(64, 64), (48, 64)]))).backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("bbox_attention.", "mask_head.")) for k in changed)


def test_training_aids_get_no_masks_and_the_loss_runs():
    cfg = with_aids(SEGM, query_groups=2, denoising={"groups": 2}, dense={"boxes": True})
    model = build_model(cfg).train()
    criterion = build_criterion(5, LossConfig(), model.aids)
    targets = _targets([(64, 64), (48, 64)])
    out = model([torch.randn(3, 64, 64), torch.randn(3, 48, 64)], targets=targets)
    assert out["pred_logits"].shape[1] == 16 and "pred_masks" not in out
    assert out["query_masks"].all().shape[:2] == (2, 8)
    losses = criterion(out, targets)
    assert {"loss_mask", "loss_dice", "loss_ce_dn", "loss_ce_dense"} <= set(losses)
    criterion.total(losses).backward()
    assert model.mask_head.out_lay.weight.grad is not None
    assert model.detr.group_query_embed.weight.grad is not None


def test_prefixes_are_under_detr():
    model = build_model(with_aids(SEGM, dense={}))
    assert "detr.dense_embed." in model.training_only_prefixes()
    assert "detr.class_embed." in model.class_sized_prefixes()


def test_task_is_validated_by_name():
    with pytest.raises(ConfigError, match="model.task"):
        load_section(ModelConfig, {"task": "instance"}, "model")
    with pytest.raises(ConfigError, match="model.mask_head_only"):
        ModelConfig(mask_head_only=True)
    assert ModelConfig().task == "detection"


def test_training_computes_the_matched_masks_only_and_the_same_numbers():
    torch.manual_seed(0)
    model = build_model(SEGM).train()
    criterion = build_criterion(5, LossConfig(), model.aids)
    images = [torch.randn(3, 64, 64), torch.randn(3, 48, 64)]
    targets = _targets([(64, 64), (48, 64)])
    lazy = model(images)
    full = lazy["query_masks"].all()
    pairs = (torch.tensor([1, 0, 1]), torch.tensor([3, 5, 0]))
    torch.testing.assert_close(lazy["query_masks"](*pairs), full[pairs], atol=1e-5, rtol=1e-5)
    model.matched_masks_only = False
    dense = model(images)
    assert torch.equal(dense["pred_masks"], full)
    a, b = criterion(lazy, targets), criterion(dense, targets)
    for key in ("loss_mask", "loss_dice"):
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_lazy_masks_keep_the_precision_of_their_forward_pass():
    model = build_model(SEGM).train()
    criterion = build_criterion(5, LossConfig(), model.aids)
    images, targets = [torch.randn(3, 64, 64)], _targets([(64, 64)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        inside = out["query_masks"].all()
    outside = out["query_masks"].all()  # as the criterion calls it: after the autocast
    assert inside.dtype == outside.dtype == torch.bfloat16 and torch.equal(inside, outside)
    criterion.total(criterion(out, targets)).backward()
