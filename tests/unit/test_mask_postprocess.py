"""Mask logits -> instance masks and panoptic maps at the original image size."""

import torch

from detr.models.mask_postprocess import instance_masks, mask_logits_at_size, panoptic_segments


def _block_logits(shape, rows, cols, inside=8.0):
    logits = torch.full(shape, -inside)
    logits[..., rows, cols] = inside
    return logits


def test_instance_masks_read_only_the_image_cells_and_reach_the_original_size():
    logits = _block_logits((1, 10, 12), slice(2, 5), slice(1, 4))  # grid of a padded batch
    logits[0, 8:, :] = 8.0  # padding below the image (input 28 x 40 -> 7 x 10 cells)
    masks = instance_masks(logits, (28, 40), (56, 80))
    assert masks.shape == (1, 56, 80) and masks.dtype == torch.bool
    # cells 2..4 x 1..3 = input px 8..20 x 4..16 = original px 16..40 x 8..32 (x2)
    assert masks[0, 18:38, 10:30].all()
    assert not masks[0, :12].any() and not masks[0, 44:].any() and not masks[0, :, 36:].any()


def test_mask_logits_at_size_keeps_the_geometry_of_odd_sizes():
    logits = torch.randn(3, 9, 9)
    out = mask_logits_at_size(logits, (33, 30), (50, 41))
    assert out.shape == (3, 50, 41)
    cells = torch.zeros(1, 40, 40)
    for h_in in range(1, 160):  # every input size against many original sizes: never short
        for height in range(1, 400, 7):
            assert mask_logits_at_size(cells, (h_in, 16), (height, 16)).shape[1] == height
    assert mask_logits_at_size(logits[:0], (33, 30), (50, 41)).shape == (0, 50, 41)


def _logits(classes, num_classes=4, score=10.0):
    """Class logits [Q, C+1]: query q confident in classes[q] (None = no object)."""
    out = torch.zeros(len(classes), num_classes + 1)
    for q, c in enumerate(classes):
        out[q, num_classes if c is None else c] = score
    return out


def test_panoptic_map_merges_stuff_and_drops_unsure_queries():
    # 4 x 4 cells -> a 16 x 16 image. Queries: thing 1 (top-left), stuff 3 twice (right half,
    # bottom-left), no object (everywhere), thing 2 below the threshold.
    masks = torch.full((5, 4, 4), -5.0)
    masks[0, :2, :2] = 5
    masks[1, :, 2:] = 5
    masks[2, 2:, :2] = 5
    masks[3] = 9
    masks[4] = 9
    logits = _logits([1, 3, 3, None, 2])
    logits[4, 2] = 0.5  # not confident
    result = panoptic_segments(logits, masks, (16, 16), (16, 16), is_thing={1: True, 3: False},
                               label_to_category=[10, 1, 2, 3])
    segments, info = result["segments"], result["segments_info"]
    assert segments.dtype == torch.int32 and segments.shape == (16, 16)
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in info] == [
        (1, 1, 1, 64), (2, 3, 0, 192)]
    assert (segments[:8, :8] == 1).all() and (segments[8:] == 2).all()
    assert info[1]["score"] > 0.99


def test_tiny_segments_are_dropped_and_their_pixels_reassigned():
    masks = torch.full((2, 4, 4), -5.0)
    masks[0] = 5
    masks[1, 0, 0] = 9  # one cell: 16 px at the input size, 4 px at half the size
    result = panoptic_segments(_logits([1, 2]), masks, (16, 16), (8, 8), min_area=4)
    assert [s["category_id"] for s in result["segments_info"]] == [1]
    assert (result["segments"] == 1).all()


def test_no_confident_query_gives_an_all_void_map():
    result = panoptic_segments(_logits([None, None]), torch.randn(2, 4, 4), (16, 16), (20, 20))
    assert result["segments_info"] == [] and not result["segments"].any()
    assert result["segments"].shape == (20, 20)


def test_mask_threshold_leaves_uncovered_pixels_void():
    masks = torch.full((1, 4, 4), -5.0)
    masks[0, :2] = 5
    result = panoptic_segments(_logits([1]), masks, (16, 16), (16, 16), mask_threshold=0.5)
    assert (result["segments"][:7] == 1).all() and not result["segments"][9:].any()
    everywhere = panoptic_segments(_logits([1]), masks, (16, 16), (16, 16))
    assert (everywhere["segments"] == 1).all()
