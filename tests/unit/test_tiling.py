"""Tile geometry (detr.data.tiling): the grid covers the image, boxes map back exactly,
fragments under min_visible are dropped, merging keeps one box per object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detr.data.tiling import Tile, TileOptions, axis_starts, crop_boxes, merge, tile_grid, to_image


@pytest.mark.parametrize(("height", "width", "size", "overlap"),
                         [(1000, 1500, 256, 0.2), (257, 256, 256, 0.0), (999, 37, 128, 0.5),
                          (2000, 2000, 512, 0.25)])
def test_tiles_cover_the_image_with_the_overlap(height, width, size, overlap):
    tiles = tile_grid(height, width, size=size, overlap=overlap)
    covered = torch.zeros(height, width, dtype=torch.int32)
    for t in tiles:
        assert t.x0 >= 0 and t.y0 >= 0
        assert t.x0 + t.width <= width and t.y0 + t.height <= height
        assert (t.width, t.height) == (min(size, width), min(size, height))
        covered[t.y0:t.y0 + t.height, t.x0:t.x0 + t.width] += 1
    assert covered.min() >= 1
    for length in (height, width):
        starts = axis_starts(length, size, overlap)
        shared = [size - (b - a) for a, b in zip(starts, starts[1:], strict=False)]
        assert all(s >= overlap * size - 1 for s in shared), shared


def test_an_image_smaller_than_the_tile_is_one_tile_itself():
    assert tile_grid(200, 300, size=512, overlap=0.2) == [Tile(0, 0, 300, 200)]
    boxes = torch.tensor([[10.5, 20.25, 100.0, 150.0]])
    inside, kept = crop_boxes(boxes, Tile(0, 0, 300, 200), min_visible=0.5)
    assert torch.equal(inside, boxes) and kept.tolist() == [0]


def test_boxes_map_back_exactly():
    boxes = torch.tensor([[300.5, 310.25, 340.75, 360.0], [10.0, 10.0, 20.0, 20.0]])
    tile = Tile(256, 300, 128, 128)
    inside, kept = crop_boxes(boxes, tile, min_visible=0.5)
    assert kept.tolist() == [0]
    assert torch.equal(inside, torch.tensor([[44.5, 10.25, 84.75, 60.0]]))
    assert torch.equal(to_image(inside, tile), boxes[:1])


def test_fragments_below_min_visible_are_dropped_and_the_rest_clipped():
    tile = Tile(0, 0, 100, 100)
    boxes = torch.tensor([[90.0, 0.0, 110.0, 10.0],   # half inside: kept at 0.5
                          [95.0, 0.0, 115.0, 10.0],   # a quarter inside: dropped
                          [120.0, 0.0, 130.0, 10.0],  # outside
                          [100.0, 0.0, 110.0, 10.0]])  # touches the border only: no area
    inside, kept = crop_boxes(boxes, tile, min_visible=0.5)
    assert kept.tolist() == [0]
    assert inside.tolist() == [[90.0, 0.0, 100.0, 10.0]]
    _, kept = crop_boxes(boxes, tile, min_visible=0.2)
    assert kept.tolist() == [0, 1]


@pytest.mark.parametrize("match", ["ios", "iou"])
def test_merge_keeps_one_box_per_object_and_class(match):
    boxes = torch.tensor([[100.0, 100.0, 140.0, 140.0],   # object A, seen whole
                          [101.0, 100.0, 140.0, 141.0],   # A again, from the next tile
                          [100.0, 100.0, 140.0, 140.0],   # same place, another class
                          [300.0, 300.0, 320.0, 320.0]])  # object B
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([1, 1, 2, 1])
    kept_boxes, kept_scores, kept_labels = merge(boxes, scores, labels, match=match)
    assert kept_scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert kept_labels.tolist() == [1, 2, 1]
    assert torch.equal(kept_boxes, boxes[[0, 2, 3]])


def test_merge_by_ios_removes_a_fragment_cut_by_a_tile_border():
    """The same object, whole in one tile and cut by the border of the next: IoU 0.3 (NMS at
    0.5 keeps both), but the fragment lies inside the whole box."""
    boxes = torch.tensor([[100.0, 100.0, 140.0, 140.0], [128.0, 100.0, 140.0, 140.0]])
    scores, labels = torch.tensor([0.9, 0.7]), torch.tensor([3, 3])
    assert len(merge(boxes, scores, labels, match="iou")[1]) == 2
    kept_boxes, kept_scores, _ = merge(boxes, scores, labels, match="ios")
    assert kept_scores.tolist() == pytest.approx([0.9])
    assert torch.equal(kept_boxes, boxes[:1])


def test_fuse_averages_the_group_by_score():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]])
    kept, scores, _ = merge(boxes, torch.tensor([0.75, 0.25]), torch.tensor([0, 0]), fuse=True)
    assert torch.allclose(kept, torch.tensor([[0.5, 0.0, 10.5, 10.0]]))
    assert scores.tolist() == [0.75]


def test_merge_of_nothing_and_bad_options():
    boxes, scores, labels = merge(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0).long())
    assert boxes.shape == (0, 4) and len(scores) == len(labels) == 0
    with pytest.raises(ValueError, match="overlap"):
        TileOptions(size=256, overlap=1.0)
    with pytest.raises(ValueError, match="size"):
        TileOptions(size=8)
    with pytest.raises(ValueError, match="match"):
        TileOptions(size=256, match="giou")


def _reference_greedy(boxes, scores, labels, threshold):
    """Plain greedy suppression by intersection over the smaller box, all pairs at once."""
    order = scores.argsort(descending=True, stable=True)
    b = boxes[order]
    inter = (torch.min(b[:, None, 2:], b[None, :, 2:])
             - torch.max(b[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    area = (b[:, 2:] - b[:, :2]).prod(-1)
    ios = inter / torch.min(area[:, None], area[None, :])
    close = ((ios >= threshold) & (labels[order][:, None] == labels[order][None, :])).numpy()
    gone = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not gone[i]:
            keep.append(int(order[i]))
            gone |= close[i]
    return keep


def test_chunked_merge_equals_plain_greedy_and_limit_keeps_the_first():
    gen = torch.Generator().manual_seed(0)
    n = 2500  # more than one chunk
    xy = torch.rand(n, 2, generator=gen) * 900
    wh = 5 + torch.rand(n, 2, generator=gen) * 60
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    want = _reference_greedy(boxes, scores, labels, 0.5)
    kept_boxes, kept_scores, _ = merge(boxes, scores, labels)
    assert torch.equal(kept_boxes, boxes[want]) and torch.equal(kept_scores, scores[want])
    limited = merge(boxes, scores, labels, limit=100)
    assert torch.equal(limited[0], boxes[want[:100]])
    assert len(merge(boxes, scores, labels, match="iou", limit=7)[1]) == 7
