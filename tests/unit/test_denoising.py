"""Denoising training (model.aids.denoising, DN-DETR): query construction, isolation, losses."""

import dataclasses

import pytest
import torch
from torchvision.ops import box_convert

from detr.config import AidsConfig, ConfigError, DenoisingConfig, LossConfig, QueryGroupsConfig
from detr.models.aids import block_diagonal
from detr.models.aids.denoising import Denoiser, attention_mask, box_sine_embedding
from detr.models.criterion import build_criterion
from detr.models.detr import build_model


def _aids(cfg, *, query_groups=None, **denoising):
    groups = QueryGroupsConfig(query_groups) if query_groups else None
    return dataclasses.replace(cfg, aids=AidsConfig(denoising=DenoisingConfig(**denoising),
                                                    query_groups=groups))


def _targets():
    return [{"labels": torch.tensor([1, 2]),
             "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
            {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]


def test_queries_pad_to_the_most_boxes_and_repeat_per_group():
    dn = Denoiser(5, 32, groups=3)(_targets())
    assert dn.query_pos.shape == dn.content.shape == (2, 6, 32)
    assert dn.labels.tolist() == [[1, 2] * 3, [-1, -1] * 3]
    assert dn.valid.tolist() == [[True] * 6, [False] * 6]
    assert torch.equal(dn.content[1], torch.zeros(6, 32))  # padding slots carry nothing


def test_box_noise_moves_corners_within_the_bound():
    den = Denoiser(5, 32, groups=50, box_noise=0.4)
    gt = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]]).repeat(1, 200, 1)
    noisy = den._noisy_boxes(gt)
    moved = (box_convert(noisy, "cxcywh", "xyxy") - box_convert(gt, "cxcywh", "xyxy")).abs()
    bound = 0.4 * torch.tensor([0.2, 0.4, 0.2, 0.4]) / 2
    assert torch.all(moved <= bound + 1e-6)
    assert moved.max() > 0.5 * bound.min()  # and it does move
    assert torch.equal(Denoiser(5, 32, groups=1, box_noise=0.0)._noisy_boxes(gt), gt)


def test_attention_mask_isolates_inference_queries_and_groups():
    dn = Denoiser(5, 32, groups=2)(_targets())
    allowed = attention_mask(dn, num_queries=3, objects=block_diagonal(2, 3, torch.device("cpu")))
    assert allowed.shape == (2, 1, 6 + 4, 6 + 4)
    a = allowed[0, 0]
    assert not a[:6, 6:].any()  # object queries never see denoising queries
    assert a[:3, :3].all() and not a[:3, 3:6].any()  # query groups stay apart
    assert a[6:, :3].all() and not a[6:, 3:6].any()  # denoising sees the first group only
    assert a[6:8, 6:8].all() and not a[6:8, 8:10].any()  # denoising groups stay apart
    assert not allowed[1, 0, :, 6:].any()  # padding slots are hidden from everyone


def test_object_queries_are_unchanged_by_denoising_queries(tiny_cfg):
    model = build_model(_aids(tiny_cfg, groups=3)).train()
    model.backbone.eval()  # BatchNorm on running statistics in both runs; dropout is 0
    images = [torch.randn(3, 64, 80), torch.randn(3, 48, 64)]
    with torch.no_grad():
        with_dn = model(images, None, _targets())
        without = model(images)
    assert with_dn["denoising"]["pred_boxes"].shape == (2, 6, 4)
    assert "denoising" not in without
    assert torch.allclose(with_dn["pred_logits"], without["pred_logits"], atol=1e-5)
    assert "denoising" not in model.eval()(images, None, _targets())  # training only


def test_denoising_losses_train_the_denoiser(tiny_cfg):
    cfg = _aids(tiny_cfg, groups=2, query_groups=2)
    model = build_model(cfg).train()
    criterion = build_criterion(cfg.num_classes, LossConfig(), model.aids)
    losses = criterion(model([torch.randn(3, 64, 64)] * 2, None, _targets()), _targets())
    names = {k for k in losses if "_dn" in k}
    assert names == {f"loss_{t}_dn{s}" for t in ("ce", "bbox", "giou")
                     for s in ["", *(f"_{i}" for i in range(cfg.dec_layers - 1))]}
    assert all(torch.isfinite(losses[k]) for k in names)
    criterion.total(losses).backward()
    assert model.denoiser.dn_pos_embed[0].weight.grad.abs().sum() > 0
    assert model.denoiser.dn_label_embed.weight.grad.abs().sum() > 0
    # the total weights the denoising terms like their matched counterparts
    plain = {k: v for k, v in losses.items() if "_dn" not in k}
    extra = sum(criterion.coefs[f"loss_{t}"] * losses[f"loss_{t}_dn{s}"]
                for t in ("ce", "bbox", "giou") for s in ["", "_0"])
    assert torch.allclose(criterion.total(losses), criterion.total(plain) + extra)


def test_box_sine_embedding_distinguishes_coordinates():
    a = box_sine_embedding(torch.tensor([0.2, 0.5, 0.1, 0.1]), 32)
    b = box_sine_embedding(torch.tensor([0.5, 0.2, 0.1, 0.1]), 32)
    assert a.shape == (32,) and not torch.allclose(a, b)


def test_disabled_by_default_keeps_the_official_keys(tiny_cfg):
    keys = build_model(tiny_cfg).state_dict()
    assert not any(k.startswith("denoiser.") for k in keys)
    keys = build_model(_aids(tiny_cfg, groups=1, labels=False)).state_dict()
    assert any(k.startswith("denoiser.dn_pos_embed") for k in keys)
    assert not any(k.startswith("denoiser.dn_label_embed") for k in keys)


def test_bad_settings_are_refused_where_the_config_is_read(tiny_cfg):
    with pytest.raises(ConfigError, match=r"model\.aids\.denoising\.groups: 0 must be >= 1"):
        _aids(tiny_cfg, groups=0)
    with pytest.raises(ConfigError, match=r"model\.aids\.denoising\.label_noise: 1.5"):
        _aids(tiny_cfg, label_noise=1.5)
    with pytest.raises(ConfigError, match=r"model\.aids\.denoising\.box_noise: -0.1"):
        _aids(tiny_cfg, box_noise=-0.1)
    # the box encoding needs hidden_dim divisible by 8 (fine without denoising)
    odd = dataclasses.replace(tiny_cfg, hidden_dim=36, nheads=2)
    with pytest.raises(ConfigError, match=r"model\.hidden_dim: 36 .*by 8.*e\.g\. 32"):
        _aids(odd)
