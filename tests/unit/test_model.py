import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from detr.models.backbone import Backbone
from detr.models.detr import DETR, build_model, count_parameters
from detr.models.postprocess import PostProcess
from detr.models.transformer import Attention, Transformer
from tests.conftest import with_aids


def test_output_contract_for_tensor_and_list_inputs(tiny_cfg):
    model = build_model(tiny_cfg).eval()
    q, c = tiny_cfg.num_queries, tiny_cfg.num_classes
    out = model(torch.randn(2, 3, 64, 96))
    assert out["pred_logits"].shape == (2, q, c + 1)
    assert out["pred_boxes"].shape == (2, q, 4)
    assert len(out["aux_outputs"]) == tiny_cfg.dec_layers - 1
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    out = model([torch.randn(3, 64, 96), torch.randn(3, 80, 40)])
    assert out["pred_logits"].shape == (2, q, c + 1)


def test_aux_loss_off_has_no_aux_outputs(tiny_cfg):
    model = build_model(dataclasses.replace(tiny_cfg, aux_loss=False)).eval()
    assert "aux_outputs" not in model(torch.randn(1, 3, 64, 64))


def _randomise_batchnorm(model):
    """Give every BatchNorm non-trivial statistics and biases, as a trained model has."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


@pytest.mark.parametrize("variant", [{}, {"pre_norm": True}, {"position_embedding": "learned"},
                                     {"input_pos": True, "value_pos": True}])
@pytest.mark.parametrize("sizes", [((96, 128), (160, 192)), ((70, 101), (133, 150))])
def test_padding_invariance(tiny_cfg, variant, sizes):
    """An image alone and padded in a batch beside a larger one: the same predictions.

    Holds because the padding mask reaches every backbone convolution (mask_padding), the
    positional encoding and every attention; sizes need not be multiples of 32.
    """
    model = _randomise_batchnorm(build_model(dataclasses.replace(tiny_cfg, **variant))).eval()
    small, large = torch.randn(3, *sizes[0]), torch.randn(3, *sizes[1])
    with torch.no_grad():
        alone = model([small])
        batched = model([large, small])
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(alone[key][0], batched[key][1], atol=1e-4), key
    assert torch.allclose(alone["aux_outputs"][0]["pred_boxes"][0],
                          batched["aux_outputs"][0]["pred_boxes"][1], atol=1e-4)


def test_explicit_mask_equals_list_input(tiny_official_cfg):
    from detr.models.padding import pad_images

    model = build_model(tiny_official_cfg).eval()
    images = [torch.randn(3, 64, 64), torch.randn(3, 96, 32)]
    with torch.no_grad():
        a = model(images)["pred_boxes"]
        b = model(*pad_images(images))["pred_boxes"]
    assert torch.equal(a, b)


def test_attention_equals_torch_multihead_attention_with_the_same_weights():
    torch.manual_seed(1)
    ours = Attention(32, 4).eval()
    ref = nn.MultiheadAttention(32, 4).eval()
    ref.load_state_dict(ours.state_dict())  # same parameter names
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    expected = ref(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                   key_padding_mask=pad)[0].transpose(0, 1)
    assert torch.allclose(ours(q, k, v, pad), expected, atol=1e-5)


def test_bf16_autocast_on_cpu_attends_in_fp32_and_returns_bf16(monkeypatch):
    torch.manual_seed(1)
    attention = Attention(32, 4)
    q, k = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    expected = attention(q, k, k, pad)
    sdpa, seen = F.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        seen.append((args[0].dtype, out.dtype))
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)  # torch.nn.functional
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, k, pad)
    assert seen == [(torch.float32, torch.float32)]  # the CPU's bf16 kernels are the slow ones
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.05)  # bf16 projections, fp32 softmax
    out.float().sum().backward()
    assert attention.in_proj_weight.grad is not None
    assert torch.isfinite(attention.in_proj_weight.grad).all()


@pytest.mark.parametrize("levels", [1, 2])
def test_bf16_autocast_runs_the_backbone_in_bf16_and_the_transformer_and_heads_in_fp32(
        tiny_cfg, levels):
    cfg = with_aids(dataclasses.replace(tiny_cfg, last_stage="layer3", feature_levels=levels),
                    dense={})
    model = build_model(cfg).train()
    seen = {}
    model.input_proj.register_forward_hook(lambda m, i, out: seen.update(proj=out.dtype))
    model.transformer.register_forward_pre_hook(
        lambda m, args: seen.update(transformer=args[0].dtype))
    if levels > 1:  # the multi-scale path calls forward_tokens, not the module
        forward_tokens = model.transformer.forward_tokens

        def spy(src, *args):
            seen["transformer"] = src.dtype
            return forward_tokens(src, *args)

        model.transformer.forward_tokens = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([torch.randn(3, 64, 80), torch.randn(3, 48, 48)])
    assert seen["proj"] == torch.bfloat16  # backbone and projection: the convolutions
    assert seen["transformer"] == torch.float32
    for key in ("pred_logits", "pred_boxes"):
        assert out[key].dtype == torch.float32
        assert all(aux[key].dtype == torch.float32 for aux in out["aux_outputs"])
    assert out["dense"]["pred_logits"].dtype == torch.float32
    with torch.no_grad():  # without autocast: all fp32, the same modules
        assert model([torch.randn(3, 64, 80)])["pred_boxes"].dtype == torch.float32


class _RefTransformer(nn.Module):
    """DETR's post-norm transformer written with nn.MultiheadAttention, sequence-first, as in
    the paper's description; loads our state dict (the official key names) strictly."""

    def __init__(self, d, heads, ff, n_enc, n_dec, input_pos=False, value_pos=False):
        super().__init__()
        self.input_pos = input_pos  # the positions added to the encoder's input once
        self.value_pos = value_pos  # the decoder's cross-attention values get the positions

        def layer(kinds):
            m = nn.Module()
            for k in kinds:
                setattr(m, k, nn.MultiheadAttention(d, heads))
            m.linear1, m.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
            for i in range(1, len(kinds) + 2):
                setattr(m, f"norm{i}", nn.LayerNorm(d))
            return m

        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(layer(["self_attn"]) for _ in range(n_enc))
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(layer(["self_attn", "multihead_attn"])
                                            for _ in range(n_dec))
        self.decoder.norm = nn.LayerNorm(d)

    def forward(self, src, mask, query_embed, pos):
        b, d, h, w = src.shape
        src, pos = src.flatten(2).permute(2, 0, 1), pos.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        qpos = query_embed.unsqueeze(1).repeat(1, b, 1)
        if self.input_pos:
            src = src + pos
        for m in self.encoder.layers:
            src = m.norm1(src + m.self_attn(src + pos, src + pos, src, key_padding_mask=mask)[0])
            src = m.norm2(src + m.linear2(F.relu(m.linear1(src))))
        tgt, outs = torch.zeros_like(qpos), []
        for m in self.decoder.layers:
            tgt = m.norm1(tgt + m.self_attn(tgt + qpos, tgt + qpos, tgt)[0])
            value = src + pos if self.value_pos else src
            tgt = m.norm2(tgt + m.multihead_attn(tgt + qpos, src + pos, value,
                                                 key_padding_mask=mask)[0])
            tgt = m.norm3(tgt + m.linear2(F.relu(m.linear1(tgt))))
            outs.append(self.decoder.norm(tgt))
        return torch.stack(outs).transpose(1, 2)


@pytest.mark.parametrize(("input_pos", "value_pos"), [(False, False), (True, False),
                                                      (False, True), (True, True)])
def test_transformer_matches_reference_with_the_same_weights(input_pos, value_pos):
    """The paper's placement of the positions, and with them at the input and/or values."""
    torch.manual_seed(2)
    ours = Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3,
                       dim_feedforward=64, dropout=0.0, input_pos=input_pos,
                       value_pos=value_pos).eval()
    ref = _RefTransformer(32, 4, 64, 2, 3, input_pos, value_pos).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    src, pos = torch.randn(2, 32, 4, 5), torch.randn(2, 32, 4, 5)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, :, 3:] = True
    query = torch.randn(6, 32)
    hs, _ = ours(src, mask, query, pos)
    assert torch.allclose(hs, ref(src, mask, query, pos), atol=1e-5)
    for other_flags in ((not input_pos, value_pos), (input_pos, not value_pos)):
        other = _RefTransformer(32, 4, 64, 2, 3, *other_flags).eval()
        other.load_state_dict(ours.state_dict(), strict=True)
        assert not torch.allclose(hs, other(src, mask, query, pos), atol=1e-3), other_flags


@pytest.mark.parametrize("flag", ["input_pos", "value_pos"])
def test_positions_in_values_work_in_the_pre_norm_layers_too(flag):
    """Same weights: the flag changes the output only through the positions (none: equal)."""
    torch.manual_seed(3)
    kw = dict(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2,
              dim_feedforward=64, dropout=0.0, pre_norm=True)
    plain = Transformer(**kw).eval()
    with_pos = Transformer(**kw, **{flag: True}).eval()
    with_pos.load_state_dict(plain.state_dict(), strict=True)
    src, query = torch.randn(2, 32, 3, 4), torch.randn(5, 32)
    pos = torch.randn(2, 32, 3, 4)
    assert not torch.allclose(plain(src, None, query, pos)[0], with_pos(src, None, query, pos)[0],
                              atol=1e-3)
    zero = torch.zeros_like(pos)
    assert torch.allclose(plain(src, None, query, zero)[0], with_pos(src, None, query, zero)[0],
                          atol=1e-6)


def test_frozen_parts_of_the_official_backbone(tiny_official_cfg):
    model = build_model(tiny_official_cfg)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "backbone.0.body.conv1.weight" in frozen
    assert any(n.startswith("backbone.0.body.layer1.") for n in frozen)
    assert not any(n.startswith("backbone.0.body.layer2.") for n in frozen)
    assert not any(n.startswith("transformer.") for n in frozen)
    counts = count_parameters(model)
    assert counts["trainable"] < counts["total"]


def test_without_padding_masks_the_borders_leak_as_in_the_official_release(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, mask_padding=False)
    model = _randomise_batchnorm(build_model(cfg)).eval()
    small, large = torch.randn(3, 96, 128), torch.randn(3, 160, 192)
    with torch.no_grad():
        alone, batched = model([small]), model([large, small])
    assert not torch.allclose(alone["pred_boxes"][0], batched["pred_boxes"][1], atol=1e-4)


def test_dilation_halves_the_backbone_stride():
    x, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    assert Backbone("resnet50")(x, mask)[0].shape[-2:] == (2, 2)
    assert Backbone("resnet50", dilation=True)(x, mask)[0].shape[-2:] == (4, 4)
    with pytest.raises(ValueError, match="dilation"):
        Backbone("resnet18", dilation=True)


@pytest.mark.parametrize(("stage", "stride", "channels", "r50_channels", "absent"), [
    ("layer3", 16, 256, 1024, ("layer4",)),
    ("layer2", 8, 128, 512, ("layer3", "layer4")),
])
def test_an_earlier_last_stage_gives_its_stride_without_the_later_stages(
        tiny_cfg, stage, stride, channels, r50_channels, absent):
    x, mask = torch.randn(2, 3, 96, 64), torch.zeros(2, 96, 64, dtype=torch.bool)
    mask[1, 3 * stride:] = True  # the second image is 3 rows of features high
    backbone = Backbone("resnet18", norm="bn", last_stage=stage)
    features, out_mask = backbone.eval()(x, mask)
    assert features.shape == (2, channels, 96 // stride, 64 // stride)
    assert backbone.num_channels == channels
    assert (~out_mask[1]).all(1).tolist() == [True] * 3 + [False] * (96 // stride - 3)
    assert not any(k.startswith(absent) for k in backbone.body.state_dict())
    assert Backbone("resnet50", last_stage=stage).num_channels == r50_channels
    model = build_model(with_aids(dataclasses.replace(tiny_cfg, last_stage=stage), dense={}))
    assert model.input_proj.in_channels == channels
    out = model.train()([torch.randn(3, 64, 80), torch.randn(3, 48, 48)])
    assert torch.isfinite(out["pred_boxes"]).all()
    # the dense head classifies every token of the padded 64 x 80 batch
    assert out["dense"]["pred_logits"].shape[1] == (64 // stride) * (80 // stride)


def test_last_stage_refuses_dc5_and_unknown_stages():
    for stage in ("layer3", "layer2"):
        with pytest.raises(ValueError, match=f"last_stage: {stage}"):
            Backbone("resnet50", dilation=True, last_stage=stage)
    with pytest.raises(ValueError, match="last_stage"):
        Backbone("resnet50", last_stage="layer1")


def test_group_norm_backbone_builds_and_runs(tiny_cfg):
    model = build_model(dataclasses.replace(tiny_cfg, norm="gn")).eval()
    assert isinstance(model.backbone[0].body.bn1, nn.GroupNorm)
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64))["pred_boxes"]).all()


def test_postprocess_gives_absolute_xyxy_and_category_ids():
    logits = torch.full((1, 2, 4), -10.0)
    logits[0, 0, 1] = 10.0
    logits[0, 1, 2] = 10.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    out = PostProcess(label_to_category=[3, 7, 11])(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    assert out["labels"].tolist() == [7, 11]
    assert torch.allclose(out["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0],
                                                      [0.0, 50.0, 100.0, 100.0]]))
    assert torch.all(out["scores"] > 0.99)


def test_query_groups_train_only_and_isolated(tiny_cfg):
    model = build_model(with_aids(tiny_cfg, query_groups=3))
    x = torch.randn(1, 3, 64, 64)
    out = model.train()(x)
    assert out["pred_logits"].shape[1] == 3 * tiny_cfg.num_queries and out["query_groups"] == 3
    # Groups do not attend to each other: group 0 of a grouped run equals the plain model.
    # (Backbone in eval so BatchNorm uses running statistics in both runs; dropout is 0.)
    model.backbone.eval()
    with torch.no_grad():
        grouped = model(x)["pred_boxes"][:, : tiny_cfg.num_queries]
        plain = model.eval()(x)
    assert plain["pred_boxes"].shape[1] == tiny_cfg.num_queries and "query_groups" not in plain
    assert torch.allclose(grouped, plain["pred_boxes"], atol=1e-5)
    assert "group_query_embed.weight" in model.state_dict()


def test_the_aids_report_their_training_only_and_class_sized_keys(tiny_cfg):
    """A model without aids has no training-only keys; with all three, every key under the
    reported prefixes exists and belongs to an aid (the checkpoint loader relies on it)."""
    plain = build_model(tiny_cfg)
    prefixes = DETR.training_only_prefixes()
    assert set(prefixes) == {"group_query_embed.", "denoiser.", "dense_embed.",
                             "dense_bbox_embed."}
    assert plain.aids == [] and not any(k.startswith(prefixes) for k in plain.state_dict())
    rich = build_model(with_aids(tiny_cfg, dense={"boxes": True}, query_groups=2,
                                 denoising={"groups": 1}))
    assert [aid.name for aid in rich.aids] == ["query_groups", "denoising", "dense"]
    for aid in rich.aids:
        own = {f"{name}.{k}" for name, m in aid.named_children() for k in m.state_dict()}
        assert own and all(k.startswith(aid.training_only_prefixes()) for k in own)
        assert own <= set(rich.state_dict())
    assert set(rich.state_dict()) - set(plain.state_dict()) == {
        k for k in rich.state_dict() if k.startswith(prefixes)}
    assert rich.class_sized_prefixes() == ("class_embed.", "denoiser.dn_label_embed.",
                                           "dense_embed.")
    with pytest.raises(ValueError, match="backbone_weights: 'w.pth' is a file"):
        build_model(dataclasses.replace(tiny_cfg, backbone_weights="w.pth"))
