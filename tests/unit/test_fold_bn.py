"""detr.models.backbone.fold_batchnorm: BatchNorm folded into the convolutions for inference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detr.inference import Predictor
from detr.models.backbone import fold_batchnorm
from detr.models.detr import build_model

NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _with_random_statistics(model: nn.Module) -> nn.Module:
    """Statistics and affine parameters far from the identity, so folding is not trivial."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, NORMS):
            for name, low, high in (("running_mean", -1, 1), ("running_var", 0.3, 3),
                                    ("weight", 0.5, 1.5), ("bias", -0.5, 0.5)):
                t = getattr(m, name)
                t.data.copy_(torch.rand(t.shape, generator=g) * (high - low) + low)
    return model.eval()


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_folded_model_gives_the_same_outputs_with_padding(tiny_cfg, norm):
    model = _with_random_statistics(build_model(dataclasses.replace(tiny_cfg, norm=norm)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)

    assert not any(isinstance(m, NORMS) for m in folded.modules())
    assert sum(isinstance(m, NORMS) for m in model.modules()) > 10  # the original is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Only the folded convolutions are new tensors; the transformer is shared, not copied.
    assert folded.transformer.encoder.layers[0].linear1.weight is \
        model.transformer.encoder.layers[0].linear1.weight

    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 96, 128, generator=g), torch.randn(3, 70, 90, generator=g)]
    with torch.no_grad():
        a, b = model(images), folded(images)  # the second image is padded: masks still apply
        alone = folded([images[1]])
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone["pred_boxes"][0], a["pred_boxes"][1], atol=1e-4, rtol=1e-4)


def test_folding_needs_eval_mode(tiny_cfg):
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(build_model(tiny_cfg).train())


def test_predictor_detects_the_same_with_and_without_the_fast_path(tiny_cfg):
    model = _with_random_statistics(build_model(tiny_cfg))
    image = (torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(2)) * 255).byte()
    kw = dict(scale=96, max_size=160, device="cpu", score_threshold=0.0, top_k=10)
    fast, plain = Predictor(model, **kw), Predictor(model, fold_bn=False, channels_last=False, **kw)
    assert fast.model is model and plain.model is model  # keys and weights as given
    (a,), (b,) = fast.predict(image), plain.predict(image)
    torch.testing.assert_close(a.boxes, b.boxes, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-4)
    assert torch.equal(a.labels, b.labels)
