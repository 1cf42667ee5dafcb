"""Side by side with the official DETRsegm (facebookresearch/detr models/segmentation.py): its
state dict loads into ours strictly and both give the same outputs.

Needs a checkout of the official code at /work/official-detr (or $DETR_OFFICIAL); CI has none,
so these tests skip there (the standalone tests of test_segmentation_model.py and
test_panoptic_keys.py stand for them).
"""

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from detr.config import ModelConfig
from detr.models.detr import build_model

OFFICIAL = Path(os.environ.get("DETR_OFFICIAL", "/work/official-detr"))
pytestmark = pytest.mark.skipif(not (OFFICIAL / "models" / "segmentation.py").is_file(),
                                reason=f"no official DETR checkout at {OFFICIAL} "
                                       f"(set DETR_OFFICIAL to one)")

# The official head hard-codes resnet50's channels; GroupNorm(8) needs hidden_dim >= 128.
CFG = ModelConfig(num_classes=20, backbone="resnet50", hidden_dim=128, nheads=8, enc_layers=1,
                  dec_layers=2, dim_feedforward=256, dropout=0.0, num_queries=10,
                  task="segmentation")


@pytest.fixture(scope="module")
def official():
    """The official DETRsegm with CFG's architecture and random weights (BatchNorm buffers
    too), in eval mode."""
    patch = pytest.MonkeyPatch()
    patch.syspath_prepend(str(OFFICIAL))
    resnet50 = torchvision.models.resnet50
    patch.setattr(torchvision.models, "resnet50",
                  lambda *a, pretrained=None, **k: resnet50(*a, **k))  # no download
    try:
        from models.backbone import Backbone, Joiner
        from models.detr import DETR
        from models.position_encoding import PositionEmbeddingSine
        from models.segmentation import DETRsegm
        from models.transformer import Transformer

        torch.manual_seed(0)
        backbone = Joiner(Backbone("resnet50", True, True, False),
                          PositionEmbeddingSine(CFG.hidden_dim // 2, normalize=True))
        backbone.num_channels = 2048
        transformer = Transformer(d_model=CFG.hidden_dim, nhead=CFG.nheads,
                                  num_encoder_layers=CFG.enc_layers,
                                  num_decoder_layers=CFG.dec_layers,
                                  dim_feedforward=CFG.dim_feedforward, dropout=0.0,
                                  return_intermediate_dec=True)
        model = DETRsegm(DETR(backbone, transformer, num_classes=CFG.num_classes,
                              num_queries=CFG.num_queries, aux_loss=True))
    finally:
        patch.undo()
        for name in [n for n in sys.modules if n.split(".")[0] in ("models", "util")]:
            del sys.modules[name]  # the official package names are generic: leave none
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias")):
                buffer.normal_(0, 0.1)
    return model.eval()


def _ours(official, **changes):
    model = build_model(dataclasses.replace(CFG, **changes))
    model.load_state_dict(official.state_dict(), strict=True)
    return model.eval()


def test_official_state_dict_has_our_keys_and_shapes(official):
    ours = build_model(CFG).state_dict()
    theirs = official.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()}


def test_same_outputs_without_padding(official):
    ours = _ours(official)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        a, b = official(x), ours(x)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)


def test_with_padding_the_official_behaviour_is_mask_padding_false(official):
    images = [torch.randn(3, 96, 128), torch.randn(3, 70, 90)]
    with torch.no_grad():
        theirs = official(images)
        same = _ours(official, mask_padding=False)(images)
        exact = _ours(official)(images)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(same[key], theirs[key], atol=1e-4, rtol=1e-4)
    # With mask_padding (our default) the padded image differs from the official outputs
    # (there, padding leaks into its features); the image that fills the batch does not.
    torch.testing.assert_close(exact["pred_masks"][0], theirs["pred_masks"][0],
                               atol=1e-4, rtol=1e-4)
    rows, cols = -(-70 // 4), -(-90 // 4)
    diff = (exact["pred_masks"][1, :, :rows, :cols] - theirs["pred_masks"][1, :, :rows, :cols])
    assert diff.abs().max() > 1e-3
