"""Multi-scale features (model.feature_levels): shapes, exact padding, keys, ONNX, config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from detr.config import ConfigError, ModelConfig, load_section
from detr.models.backbone import feature_stages, finest_stride
from detr.models.criterion import build_criterion
from detr.models.detr import build_model
from tests.conftest import TINY, with_aids

# strides 8, 16, 32 (resnet18: 128, 256, 512 channels)
THREE = dataclasses.replace(TINY, feature_levels=3)


def _model(cfg=THREE, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def test_the_encoder_sees_every_level_and_the_decoder_all_of_them():
    model = with_aids(THREE, dense={"boxes": True})
    model = build_model(model).train()
    out = model(torch.randn(2, 3, 64, 96))
    assert out["pred_logits"].shape == (2, THREE.num_queries, THREE.num_classes + 1)
    assert out["pred_boxes"].shape == (2, THREE.num_queries, 4)
    # 8x12 + 4x6 + 2x3 tokens, the dense head sees each
    assert out["dense"]["pred_logits"].shape == (2, 96 + 24 + 6, THREE.num_classes + 1)
    assert [tuple(m.shape) for m in out["dense"]["mask"]] == [(2, 8, 12), (2, 4, 6), (2, 2, 3)]
    assert model.multiscale.stages == ("layer2", "layer3", "layer4")
    assert model.feature_stride == 8


def test_dense_losses_cover_every_level_and_reach_each_projection():
    cfg = with_aids(THREE, dense={"boxes": True})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    criterion = build_criterion(cfg.num_classes, _loss(), model.aids)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.3, 0.4, 0.05, 0.05]]), "labels": torch.tensor([2])}]
    out = model([torch.randn(3, 64, 96), torch.randn(3, 40, 50)])
    losses = criterion(out, targets)
    assert {"loss_ce_dense", "loss_bbox_dense", "loss_giou_dense"} <= set(losses)
    criterion.total(losses).backward()
    for proj in model.multiscale.input_proj:
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert model.multiscale.level_embed.grad.abs().sum() > 0


def _loss():
    from detr.config import LossConfig

    return LossConfig()


@pytest.mark.parametrize("cfg", [THREE, dataclasses.replace(TINY, last_stage="layer3",
                                                              feature_levels=2)])
def test_an_image_alone_equals_it_padded_in_a_batch(cfg):
    """Exact masks at every level: the other images of a batch change nothing."""
    model = _model(cfg)
    small, large = torch.randn(3, 40, 50), torch.randn(3, 96, 128)
    with torch.no_grad():
        alone = model([small])
        together = model([small, large])
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(together[key][0], alone[key][0], atol=1e-4, rtol=1e-4)


def test_the_default_is_the_paper_and_levels_only_add_their_own_keys():
    paper = build_model(TINY).state_dict()
    assert not any(k.startswith("multiscale.") for k in paper)
    assert ModelConfig().feature_levels == 1
    levels = build_model(THREE).state_dict()
    extra = sorted(set(levels) - set(paper))
    assert set(paper) <= set(levels)
    assert extra == ["multiscale.input_proj.0.bias", "multiscale.input_proj.0.weight",
                     "multiscale.input_proj.1.bias", "multiscale.input_proj.1.weight",
                     "multiscale.level_embed"]
    assert levels["multiscale.level_embed"].shape == (3, TINY.hidden_dim)
    assert levels["multiscale.input_proj.0.weight"].shape == (TINY.hidden_dim, 128, 1, 1)
    assert levels["input_proj.weight"].shape == (TINY.hidden_dim, 512, 1, 1)  # the last level


def test_cross_attention_maps_are_on_the_finest_grid_and_sum_to_one():
    from detr.attention import cross_attention

    model = _model()
    result = cross_attention(model, [torch.randn(3, 96, 128), torch.randn(3, 70, 45)])
    assert result.stride == 8
    assert result.weights.shape == (2, THREE.num_queries, 12, 16)
    assert result.padding.shape == (2, 12, 16)
    assert result.padding[1].sum() == 12 * 16 - 9 * 6  # the small image covers 9 x 6 cells
    valid = (~result.padding)[:, None].float()
    sums = (result.weights * valid).sum((-2, -1))
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert (result.weights[1][:, result.padding[1]] == 0).all()


def test_the_scale_rule_uses_the_finest_stride():
    assert feature_stages("layer4", 3) == ("layer2", "layer3", "layer4")
    assert feature_stages("layer2", 2) == ("layer1", "layer2")
    assert finest_stride("layer4", False, 1) == 32
    assert finest_stride("layer4", True, 1) == 16
    assert finest_stride("layer4", False, 3) == 8
    assert finest_stride("layer4", True, 2) == 16  # DC5: layer3 and a dilated layer4
    assert finest_stride("layer2", False, 2) == 4


@pytest.mark.parametrize(("values", "message"), [
    ({"feature_levels": 0}, r"model.feature_levels: 0 must be in 1..4 .* e.g. 1"),
    ({"feature_levels": 5}, r"model.feature_levels: 5 must be in 1..4 .* e.g. 4"),
    ({"feature_levels": 3, "last_stage": "layer2"},
     r"model.feature_levels: 3 must be in 1..2 with model.last_stage layer2, e.g. 2"),
    ({"feature_levels": "2"}, r"model.feature_levels"),
])
def test_bad_feature_levels_name_the_key_and_a_value_that_passes(values, message):
    with pytest.raises(ConfigError, match=message):
        load_section(ModelConfig, values, "model")


@pytest.mark.slow
def test_onnx_export_of_multiscale_matches_eager(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from detr.export import export

    model = build_model(dataclasses.replace(THREE, aux_loss=False)).eval()
    result = export(model, tmp_path / "m.onnx", height=64, width=80)
    assert result.max_diff <= 1e-3 and len(result.checks) == 3
    images, mask = torch.randn(3, 3, 100, 45), torch.zeros(3, 100, 45, dtype=torch.bool)
    mask[2, 70:], mask[2, :, 40:] = True, True  # a size and padding the export never saw
    images[2, :, 70:], images[2, :, :, 40:] = 0, 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"),
                                           providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"images": images.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        eager = model(images, mask)
    assert torch.allclose(torch.from_numpy(logits), eager["pred_logits"], atol=1e-4)
    assert torch.allclose(torch.from_numpy(boxes), eager["pred_boxes"], atol=1e-4)


def test_a_multiscale_checkpoint_rebuilds_the_same_model(tmp_path):
    from detr.config import to_dict
    from detr.hub import model_from_checkpoint

    model = _model()
    path = tmp_path / "ms.pth"
    torch.save({"model": model.state_dict(), "params": {"model": to_dict(THREE)}}, path)
    rebuilt, cfg, _ = model_from_checkpoint(path)
    assert cfg.feature_levels == 3 and rebuilt.multiscale is not None
    images = [torch.randn(3, 64, 80), torch.randn(3, 40, 50)]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images)["pred_boxes"], model(images)["pred_boxes"])


@pytest.mark.parametrize(("stage", "levels"), [("layer3", 2), ("layer4", 3)])
def test_demo_settings_are_unchanged_when_the_finest_level_keeps_stride_8(stage, levels):
    from detr.settings import resolve
    from tests.unit.test_settings import _auto, _demo_profile

    sections = _auto()
    sections["model"].update(last_stage=stage, feature_levels=levels)
    res = resolve(sections, _demo_profile(), device="cpu", val_images=500).resolved
    assert (res["data.scales"], res["data.max_size"], res["train.batch_size"]) == ([112, 128],
                                                                                  128, 8)
