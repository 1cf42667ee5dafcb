"""detr.queries + the query specialisation figure: every query's box on every image."""

from __future__ import annotations

import pytest
import torch

from detr.queries import query_boxes


def _raw(boxes: list[list[float]]) -> dict:
    """Raw per-query predictions of one image (PostProcess's layout)."""
    n = len(boxes)
    return {"boxes": torch.tensor(boxes), "scores": torch.linspace(0.9, 0.1, n),
            "labels": torch.arange(n)}


def test_boxes_are_normalised_per_image_and_indexed_by_query():
    predictions = {7: _raw([[0, 0, 100, 50], [50, 25, 100, 50]]),
                   3: _raw([[0, 0, 20, 40], [10, 10, 20, 20]])}
    sizes = {7: (50, 100), 3: (40, 20)}
    result = query_boxes(predictions, sizes)
    assert result.image_ids == (3, 7) and result.num_queries == 2
    assert result.boxes.shape == (2, 2, 4)
    assert torch.allclose(result.boxes[0, 1], torch.tensor([0.5, 0.5, 1.0, 1.0]))  # q0, img 7
    assert torch.allclose(result.boxes[1, 1], torch.tensor([0.75, 0.75, 0.5, 0.5]))
    assert torch.allclose(result.boxes[1, 0], torch.tensor([0.75, 0.375, 0.5, 0.25]))
    assert result.scores.shape == (2, 2) and result.labels[1, 0] == 1


def test_thresholded_predictions_and_missing_sizes_are_refused():
    with pytest.raises(ValueError, match="one per query"):
        query_boxes({1: _raw([[0, 0, 1, 1]]), 2: _raw([[0, 0, 1, 1]] * 2)},
                    {1: (4, 4), 2: (4, 4)})
    with pytest.raises(ValueError, match="no size for image 2"):
        query_boxes({2: _raw([[0, 0, 1, 1]])}, {1: (4, 4)})
    with pytest.raises(ValueError, match="no predictions"):
        query_boxes({}, {})


def test_query_figure_has_one_panel_per_query():
    from pipelines.reporting.plots import query_figure

    predictions = {i: _raw([[i, i, i + 10, i + 20]] * 7) for i in range(5)}
    queries = query_boxes(predictions, {i: (64, 64) for i in range(5)})
    figure = query_figure(queries)
    titled = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in titled] == [f"query {q}" for q in range(7)]
    assert len(titled[0].collections[0].get_offsets()) == 5  # one point per image
    assert len(figure.axes) == 9  # a 3 x 3 grid, two empty
    assert len([ax for ax in query_figure(queries, max_panels=4).axes if ax.get_title()]) == 4
