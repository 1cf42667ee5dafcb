"""detr.export: the ONNX graph matches eager under ONNX Runtime, with dynamic shapes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from detr.models.backbone import Backbone, _probe_strides
from detr.models.detr import build_model


def test_the_exported_masked_path_equals_the_eager_paths(tiny_cfg):
    """padded=True (what the ONNX graph runs) is exact with and without padding."""
    model = build_model(tiny_cfg).eval()
    images = torch.randn(2, 3, 64, 96)
    none = torch.zeros(2, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        auto = model(images)
        forced = model(images, none, padded=True)
        listed = model([images[0], images[1, :, :40, :50]])
        padded = model(*_padded(images), padded=True)
    assert torch.allclose(auto["pred_boxes"], forced["pred_boxes"], atol=1e-6)
    assert torch.allclose(auto["pred_logits"], forced["pred_logits"], atol=1e-5)
    assert torch.allclose(listed["pred_logits"], padded["pred_logits"], atol=1e-6)


def _padded(images):
    small = images.clone()
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    small[1, :, 40:], small[1, :, :, 50:] = 0, 0
    mask[1, 40:], mask[1, :, 50:] = True, True
    return small, mask


def test_stride_probe_is_shape_only_and_side_effect_free():
    backbone = Backbone("resnet18", norm="bn", freeze_stem=False).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    strides = _probe_strides(backbone.body)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert strides.output == 32
    assert strides.inputs[backbone.body.conv1] == 1
    assert strides.inputs[backbone.body.maxpool] == 2
    assert strides.inputs[backbone.body.layer4[0].conv1] == 16
    assert strides.inputs[backbone.body.layer4[1].conv2] == 32
    assert _probe_strides(Backbone("resnet50", dilation=True).body).output == 16


@pytest.fixture
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def _with_positions_in_values(checkpoint, tmp_path):
    """The same weights, as a model with model.input_pos and model.value_pos on (they add no
    parameters)."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["params"]["model"].update(input_pos=True, value_pos=True)
    path = tmp_path / "positions_in_values.pth"
    torch.save(ckpt, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("positions_in_values", [False, True])
def test_cli_exports_a_dynamic_graph_that_matches_eager(checkpoint, positions_in_values,
                                                        tmp_path, capsys):
    import onnx
    import onnxruntime

    from detr.checkpoint import load_file
    from detr.export import main
    from detr.hub import model_from_checkpoint

    if positions_in_values:
        checkpoint = _with_positions_in_values(checkpoint, tmp_path)

    out = tmp_path / "model.onnx"
    assert main([str(checkpoint), "--out", str(out), "--height", "64", "--width", "80"]) == 0
    printed = capsys.readouterr().out
    assert "opset 18, dynamic batch x height x width" in printed
    lines = [line for line in printed.splitlines() if line.startswith("  ")]
    assert len(lines) == 3 and all(line.endswith(" ok") for line in lines)
    graph = onnx.load(str(out))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in graph.graph.input}
    assert dims == {"images": ["batch", 3, "height", "width"],
                    "mask": ["batch", "height", "width"]}
    meta = {p.key: p.value for p in graph.metadata_props}
    label_map = load_file(checkpoint)["label_map"]["categories"]
    assert json.loads(meta["categories"]) == [{"id": c["id"], "name": c["name"]}
                                              for c in label_map]
    assert json.loads(meta["val_resize"]) == {"scale": 64, "max_size": 64}

    model = model_from_checkpoint(checkpoint)[0]  # a size and batch the export never saw
    assert model.transformer.input_pos == positions_in_values
    images, mask = torch.randn(4, 3, 100, 45), torch.zeros(4, 100, 45, dtype=torch.bool)
    mask[2, 70:] = True
    images[2, :, 70:] = 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"images": images.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        eager = model(images, mask)
    assert torch.allclose(torch.from_numpy(logits), eager["pred_logits"], atol=1e-4)
    assert torch.allclose(torch.from_numpy(boxes), eager["pred_boxes"], atol=1e-4)


@pytest.mark.slow
def test_a_failed_check_keeps_the_earlier_file_and_exits_1(checkpoint, tmp_path, capsys):
    from detr.export import main

    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    code = main([str(checkpoint), "--out", str(out), "--height", "48", "--width", "64",
                 "--static", "--no-mask", "--batch", "1", "--atol", "1e-12", "--opset", "17"])
    assert code == 1
    assert "differs from eager" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file left


def test_bad_options_exit_2(checkpoint, tmp_path, capsys):
    from detr.export import main

    assert main([str(checkpoint), "--out", str(tmp_path / "m.onnx"), "--opset", "16"]) == 2
    assert "opset 16" in capsys.readouterr().err
    assert main([str(tmp_path / "none.pth"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "none.pth" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_graph_module_without_mask_refuses_nothing_and_returns_two_tensors(tiny_cfg):
    from detr.export import DetectionGraph

    model = build_model(dataclasses.replace(tiny_cfg, aux_loss=False)).eval()
    graph = DetectionGraph(model, with_mask=False)
    with torch.no_grad():
        logits, boxes = graph(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, tiny_cfg.num_queries, tiny_cfg.num_classes + 1)
    assert boxes.shape == (2, tiny_cfg.num_queries, 4)
    assert isinstance(graph, nn.Module)
