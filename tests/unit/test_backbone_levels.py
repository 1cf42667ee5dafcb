"""The backbone's intermediate levels (for the mask head and multi-scale features)."""

import pytest
import torch

from detr.models.backbone import Backbone, Joiner
from detr.models.position_encoding import build_position_encoding


def test_levels_come_in_stride_order_with_their_channels_and_masks():
    backbone = Backbone("resnet18", norm="bn", levels=("layer3", "layer1", "layer2")).eval()
    assert backbone.levels == ("layer1", "layer2", "layer3", "layer4")
    assert backbone.level_channels == (64, 128, 256, 512)
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 40:], mask[1, :, 50:] = True, True
    levels = backbone.forward_levels(images, mask)
    for (features, level_mask), stride, channels in zip(levels, (4, 8, 16, 32), (64, 128, 256, 512),
                                                          strict=True):
        assert features.shape == (2, channels, 64 // stride, 96 // stride)
        assert not level_mask[0].any()
        # the second image covers ceil(40 / s) rows and ceil(50 / s) columns
        rows, cols = -(-40 // stride), -(-50 // stride)
        assert not level_mask[1, :rows, :cols].any()
        assert level_mask[1, rows:].all() and level_mask[1, :, cols:].all()
    last, last_mask = backbone(images, mask)
    assert torch.equal(last, levels[-1][0]) and torch.equal(last_mask, levels[-1][1])


def test_each_level_of_a_padded_image_equals_the_image_alone():
    torch.manual_seed(0)
    backbone = Backbone("resnet18", norm="bn", levels=("layer1", "layer2", "layer3")).eval()
    small, large = torch.randn(3, 40, 50), torch.randn(3, 64, 96)
    batch = torch.zeros(2, 3, 64, 96)
    batch[0, :, :40, :50], batch[1] = small, large
    mask = torch.ones(2, 64, 96, dtype=torch.bool)
    mask[0, :40, :50], mask[1] = False, False
    with torch.no_grad():
        together = backbone.forward_levels(batch, mask)
        alone = backbone.forward_levels(small[None], torch.zeros(1, 40, 50, dtype=torch.bool))
    for (f_batch, m_batch), (f_alone, _) in zip(together, alone, strict=True):
        h, w = f_alone.shape[-2:]
        torch.testing.assert_close(f_batch[0, :, :h, :w], f_alone[0], atol=1e-5, rtol=1e-4)
        assert not m_batch[0, :h, :w].any() and m_batch[0, h:].all()


def test_levels_add_no_parameters_and_keep_the_official_keys():
    plain = Backbone("resnet50")
    levels = Backbone("resnet50", levels=("layer1", "layer2", "layer3"))
    assert list(plain.state_dict()) == list(levels.state_dict())


def test_a_level_after_the_last_stage_is_refused():
    with pytest.raises(ValueError, match="backbone level 'layer4'.*last_stage 'layer3'"):
        Backbone("resnet18", norm="bn", last_stage="layer3", levels=("layer4",))


def test_joiner_gives_positions_per_level():
    joiner = Joiner(Backbone("resnet18", norm="bn", levels=("layer2",)),
                    build_position_encoding("sine", 32))
    out = joiner.forward_levels(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert [tuple(pos.shape) for _, _, pos in out] == [(1, 32, 8, 8), (1, 32, 2, 2)]
