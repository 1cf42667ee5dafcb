"""detr.visualize: boxes land where they should, in their class colour; layout sizes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from detr.visualize import class_color, draw_detections, example_grid, side_by_side

BLACK = (0, 0, 0)


def _black(height: int = 40, width: int = 48) -> torch.Tensor:
    return torch.zeros(3, height, width, dtype=torch.uint8)


def test_box_border_has_the_class_colour_and_the_inside_stays_untouched():
    drawn = draw_detections(_black(), torch.tensor([[8.0, 10.0, 30.0, 32.0]]), torch.tensor([3]),
                            torch.tensor([0.9]), {3: "cat"})
    assert isinstance(drawn, Image.Image) and drawn.size == (48, 40)
    assert drawn.getpixel((8, 25)) == class_color(3)  # left edge, below the caption
    assert drawn.getpixel((30, 25)) == class_color(3)  # right edge
    assert drawn.getpixel((20, 32)) == class_color(3)  # bottom edge
    assert drawn.getpixel((20, 25)) == BLACK  # inside, below the caption
    assert drawn.getpixel((2, 2)) == BLACK  # outside


def test_colours_are_stable_per_class_and_differ_between_classes():
    assert class_color(7) == class_color(7)
    assert len({class_color(i) for i in range(1, 21)}) == 20
    assert all(0 <= v <= 255 for v in class_color(12345))


def test_score_threshold_filters_boxes_and_ground_truth_draws_all():
    boxes = torch.tensor([[2.0, 2.0, 12.0, 12.0], [20.0, 20.0, 40.0, 36.0]])
    labels = torch.tensor([1, 2])
    drawn = draw_detections(_black(), boxes, labels, torch.tensor([0.3, 0.8]),
                            score_threshold=0.5)
    assert drawn.getpixel((2, 11)) == BLACK  # low score: not drawn
    assert drawn.getpixel((20, 34)) == class_color(2)
    truth = draw_detections(_black(), boxes, labels, None)
    assert truth.getpixel((2, 11)) == class_color(1)


def test_nothing_above_threshold_gives_the_image_back():
    image = Image.new("RGB", (30, 20), (10, 20, 30))
    drawn = draw_detections(image, [[1, 1, 10, 10]], [1], [0.1])
    assert drawn.tobytes() == image.tobytes()


def test_min_side_enlarges_picture_and_boxes():
    drawn = draw_detections(_black(20, 30), [[2.0, 2.0, 10.0, 18.0]], [1], None, min_side=60)
    assert drawn.size == (90, 60)
    assert drawn.getpixel((6, 40)) == class_color(1)  # left edge at x = 2 * 3


def test_mismatched_lengths_and_bad_images_are_refused():
    with pytest.raises(ValueError, match="2 boxes, 1 labels"):
        draw_detections(_black(), torch.zeros(2, 4), [1], None)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        draw_detections(torch.zeros(40, 48, dtype=torch.uint8), torch.zeros(0, 4), [], None)


def test_side_by_side_and_grid_sizes():
    left, right = Image.new("RGB", (30, 20)), Image.new("RGB", (40, 25))
    both = side_by_side(left, right)
    assert both.width == 30 + 4 + 40 and both.height > 25  # a title band on top
    assert side_by_side(left, right, titles=None).size == (74, 25)
    grid = example_grid([Image.new("RGB", (10, 8))] * 5, columns=2)
    assert grid.size == (20, 24)
    assert example_grid([_black(8, 10)], columns=4).size == (10, 8)
    with pytest.raises(ValueError, match="columns"):
        example_grid([left], columns=0)


def test_grid_gap_separates_cells():
    grid = example_grid([Image.new("RGB", (10, 8), "black")] * 3, columns=2, gap=4)
    assert grid.size == (24, 20)
    assert grid.getpixel((11, 2)) == (255, 255, 255)  # the gap between the first two cells


def test_heat_colours_run_dark_to_bright_and_overlay_keeps_the_size():
    from detr.visualize import heat_colors, overlay_heatmap

    colours = heat_colors(torch.tensor([[0.0, 0.5, 1.0]]))
    assert colours.shape == (3, 1, 3) and colours.dtype == torch.uint8
    brightness = colours.float().sum(0)[0]
    assert brightness[0] < brightness[1] < brightness[2]
    blended = overlay_heatmap(_black(40, 48), torch.ones(40, 48))
    assert blended.size == (48, 40) and blended.getpixel((5, 5)) != BLACK
    with pytest.raises(ValueError, match="size"):
        overlay_heatmap(_black(40, 48), torch.ones(10, 10))


def test_attention_figure_has_a_panel_per_detection_plus_the_overview():
    from detr.attention import QueryAttention
    from detr.visualize import attention_figure

    heat = torch.zeros(40, 48)
    heat[10:20, 10:20] = 1.0
    items = [QueryAttention(query=q, score=0.9 - q / 10, label=q, box=torch.tensor(
        [8.0, 8.0, 24.0, 24.0]), heat=heat) for q in range(3)]
    figure = attention_figure(_black(), items, {0: "a", 1: "b", 2: "c"}, columns=4,
                              min_side=80)
    cell_w = 48 * 2  # enlarged x2 to reach 80 px
    assert figure.width == 4 * cell_w + 3 * 6 and figure.height > 80
    centre = figure.getpixel((cell_w + 6 + 2 * 15, figure.height - 80 + 2 * 15))
    corner = figure.getpixel((cell_w + 6 + 2 * 45, figure.height - 4))
    assert sum(centre) > sum(corner)  # attended cells are bright, the rest dark
    with pytest.raises(ValueError, match="no detections"):
        attention_figure(_black(), [], None)


def test_box_shape_colours_follow_the_papers_legend():
    from detr.visualize import box_shape_colors

    colours = box_shape_colors(torch.tensor([0.02, 0.9, 0.3]), torch.tensor([0.02, 0.3, 0.9]))
    small, wide, tall = colours
    assert small.argmax() == 1 and wide.argmax() == 0 and tall.argmax() == 2
    assert ((colours >= 0) & (colours <= 1)).all()
