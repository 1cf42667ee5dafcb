"""detr.export with a segmentation model: the graph also outputs ``pred_masks``, and the
parity check compares it with eager."""

from __future__ import annotations

import pytest
import torch

from detr.export import ExportError, check_onnx, export, graph_outputs
from tests.fake_segmentation import fake_segmentation


@pytest.mark.slow
def test_the_graph_outputs_the_mask_logits_and_they_match_eager(tmp_path):
    import onnx
    import onnxruntime

    model = fake_segmentation()
    out = tmp_path / "seg.onnx"
    result = export(model, out, height=64, width=80, batch_size=2)
    assert result.outputs == ("pred_logits", "pred_boxes", "pred_masks")
    assert [o.name for o in onnx.load(str(out)).graph.output] == list(result.outputs)
    assert len(result.checks) == 3 and all(c.masks_diff is not None for c in result.checks)
    assert result.max_diff <= 1e-3
    assert "masks" in result.checks[0].line(1e-3)

    images, mask = torch.randn(3, 3, 70, 45), torch.zeros(3, 70, 45, dtype=torch.bool)
    mask[1, 50:] = True
    images[1, :, 50:] = 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    masks = session.run(["pred_masks"], {"images": images.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        eager = model(images, mask)["pred_masks"]
    assert masks.shape == (3, model.num_queries, 18, 12)
    assert torch.allclose(torch.from_numpy(masks), eager, atol=1e-4)


@pytest.mark.slow
def test_a_detector_keeps_two_outputs_and_a_missing_eager_output_is_named(tmp_path):
    from detr.models.detr import build_model
    from tests.conftest import TINY

    example = (torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert graph_outputs(build_model(TINY).eval(), example) == ("pred_logits", "pred_boxes")
    seg = fake_segmentation()
    assert graph_outputs(seg, example)[-1] == "pred_masks"
    out = tmp_path / "seg.onnx"
    export(seg, out, height=64, width=64, batch_size=1, dynamic=False, with_mask=False)
    with pytest.raises(ExportError, match="pred_masks"):
        check_onnx(out, seg.detr, [example], with_mask=False)


@pytest.mark.slow
def test_the_real_mask_head_exports_and_matches_eager_with_padding(tmp_path):
    """The paper's mask head (masked convolutions and GroupNorm over real cells only), not
    the fake: the export's parity checks (padded and unpadded batches, sizes it never saw)
    and one more padded batch through onnxruntime."""
    import dataclasses

    import onnxruntime

    from detr.models.detr import build_model
    from tests.conftest import TINY

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, task="segmentation")).eval()
    out = tmp_path / "segm.onnx"
    result = export(model, out, height=64, width=64, batch_size=2)
    assert result.outputs[-1] == "pred_masks" and result.max_diff <= 1e-3
    images, mask = torch.randn(2, 3, 72, 56), torch.zeros(2, 72, 56, dtype=torch.bool)
    mask[1, 40:], mask[1, :, 30:] = True, True
    images[1][:, mask[1]] = 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    masks = session.run(["pred_masks"], {"images": images.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        eager = model(images, mask)["pred_masks"]
    print(f"ONNX vs eager, pred_masks: max |diff| {(torch.from_numpy(masks) - eager).abs().max():.2e}")
    assert torch.allclose(torch.from_numpy(masks), eager, atol=1e-4)
