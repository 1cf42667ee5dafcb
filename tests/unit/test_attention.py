"""detr.attention: the last decoder layer's cross-attention, captured for any batch."""

from __future__ import annotations

import pytest
import torch

from detr.attention import (
    attention_heatmap,
    cross_attention,
    keep_cross_attention,
    last_cross_attention_layer,
    top_query_attention,
)
from detr.models.detr import build_model
from detr.models.postprocess import PostProcess


@pytest.fixture(scope="module")
def model():
    from tests.conftest import TINY

    torch.manual_seed(0)
    return build_model(TINY).eval()


def test_padded_batch_sums_to_one_on_each_image_and_is_zero_on_its_padding(model):
    images = [torch.randn(3, 96, 128), torch.randn(3, 70, 45)]  # features 3x4 and 3x2
    result = cross_attention(model, images)
    q = model.num_queries
    assert result.weights.shape == (2, q, 3, 4) and result.padding.shape == (2, 3, 4)
    assert result.stride == 32
    assert not result.padding[0].any()
    assert result.padding[1].sum() == 3 * 2  # columns 2 and 3 of the small image
    valid = (~result.padding)[:, None].float()
    sums = (result.weights * valid).sum((-2, -1))
    assert torch.allclose(sums, torch.ones(2, q), atol=1e-5)
    assert (result.weights[1][:, result.padding[1]] == 0).all()
    assert (result.weights >= 0).all()


def test_unpadded_batch_and_explicit_mask(model):
    from detr.models.padding import pad_images

    batch = torch.randn(3, 3, 64, 96)
    result = cross_attention(model, batch)
    assert result.weights.shape == (3, model.num_queries, 2, 3)
    assert torch.allclose(result.weights.sum((-2, -1)), torch.ones(3, model.num_queries),
                          atol=1e-5)
    images = [torch.randn(3, 64, 64), torch.randn(3, 96, 40)]
    listed = cross_attention(model, images)
    masked = cross_attention(model, *pad_images(images))
    assert torch.equal(listed.weights, masked.weights)


def test_capture_leaves_outputs_and_the_model_as_they_were(model):
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(image)
    result = cross_attention(model, image)
    assert torch.equal(result.outputs["pred_boxes"], plain["pred_boxes"])
    layer = last_cross_attention_layer(model)
    assert layer.keep_weights is False and layer.last_weights is None
    with pytest.raises(RuntimeError), keep_cross_attention(model):
        assert layer.keep_weights is True
        raise RuntimeError("boom")
    assert layer.keep_weights is False and layer.last_weights is None
    with pytest.raises(ValueError, match="no DETR decoder"):
        last_cross_attention_layer(torch.nn.Linear(2, 2))


def test_heatmap_is_cropped_to_the_image_resized_and_peaks_at_one():
    weights = torch.zeros(3, 4)
    weights[0, 1] = 1.0  # all attention on row 0, column 1
    padding = torch.zeros(3, 4, dtype=torch.bool)
    padding[:, 3] = True
    heat = attention_heatmap(weights, padding, 32, (70, 90), image_size=(140, 180))
    assert heat.shape == (140, 180)
    assert heat.max() == pytest.approx(1.0) and heat.min() >= 0
    y, x = divmod(int(heat.argmax()), 180)
    assert y < 40 and 60 <= x <= 130  # the cell (0, 1) is pixels 0-31 x 32-63 at half size
    assert heat[120:, :].max() < 0.05  # far from the cell: nothing


def test_top_query_attention_ranks_queries_and_sizes_heat_maps(model):
    items = top_query_attention(model, torch.randn(3, 64, 96), postprocess=PostProcess(),
                                orig_size=(32, 48), top_k=3, display_size=(128, 192))
    assert len(items) == 3
    assert [i.score for i in items] == sorted((i.score for i in items), reverse=True)
    assert len({i.query for i in items}) == 3
    for item in items:
        assert item.heat.shape == (128, 192) and item.heat.max() == pytest.approx(1.0)
        assert item.box.shape == (4,) and 0 <= item.box[0] <= item.box[2] <= 192
    with pytest.raises(ValueError, match="top_k"):
        top_query_attention(model, torch.randn(3, 64, 64), postprocess=PostProcess(),
                            orig_size=(64, 64), top_k=0)


def test_predictor_attention_is_in_original_image_pixels(model):
    from detr.inference import Predictor

    predictor = Predictor(model, scale=64, max_size=96, device="cpu")
    image = torch.randint(0, 255, (3, 50, 75), dtype=torch.uint8)
    items = predictor.attention(image, top_k=2)
    assert len(items) == 2 and items[0].score >= items[1].score
    assert items[0].heat.shape == (50, 75)
    direct = top_query_attention(model, predictor.preprocess(image), orig_size=(50, 75),
                                 postprocess=predictor.postprocess, top_k=2)
    assert torch.equal(items[0].box, direct[0].box)  # boxes scaled to 75 x 50, not 96 x 64
