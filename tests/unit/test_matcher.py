import itertools

import pytest
import torch

from detr.models.matcher import HungarianMatcher


def _outputs(b=2, q=6, c=4, layers=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pred_logits": torch.randn(b, q, c + 1, generator=g),
             "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.5 + 0.25} for _ in range(layers)]


def _targets(sizes, c=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, c, (n,), generator=g),
             "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.3} for n in sizes]


def test_batched_equals_per_image():
    matcher = HungarianMatcher()
    out, tgts = _outputs()[0], _targets([3, 2])
    batched = matcher(out, tgts)
    for i in range(2):
        single = matcher({k: v[i:i + 1] for k, v in out.items()}, [tgts[i]])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])


def test_all_layers_at_once_equals_one_by_one():
    matcher = HungarianMatcher()
    layers, tgts = _outputs(layers=3), _targets([3, 4])
    together = matcher.match_layers(layers, tgts)
    for layer, result in zip(layers, together, strict=True):
        alone = matcher(layer, tgts)
        for (q1, t1), (q2, t2) in zip(result, alone, strict=True):
            assert torch.equal(q1, q2) and torch.equal(t1, t2)


def test_zero_targets_in_some_or_all_images():
    matcher = HungarianMatcher()
    out = _outputs()[0]
    mixed = matcher(out, _targets([0, 2]))
    assert len(mixed[0][0]) == 0 and len(mixed[1][0]) == 2
    empty = matcher(out, _targets([0, 0]))
    assert all(len(q) == 0 and len(t) == 0 for q, t in empty)


@pytest.mark.parametrize("seed", range(5))
def test_optimal_against_brute_force(seed):
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    out, tgts = _outputs(b=1, q=5, seed=seed)[0], _targets([3], seed=seed + 10)
    cost = matcher._cost(out["pred_logits"][0], out["pred_boxes"][0], tgts)
    q, t = matcher(out, tgts)[0]
    found = cost[q, t].sum().item()
    best = min(sum(cost[p[j], j].item() for j in range(3))
               for p in itertools.permutations(range(5), 3))
    assert found == pytest.approx(best, abs=1e-5)
    assert sorted(t.tolist()) == [0, 1, 2] and len(set(q.tolist())) == 3


def test_perfect_prediction_is_matched_to_its_target():
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1]])
    logits = torch.full((1, 4, 3), -5.0)
    pred = torch.tensor([[0.5, 0.5, 0.1, 0.1], boxes[1].tolist(), [0.9, 0.9, 0.1, 0.1],
                         boxes[0].tolist()]).unsqueeze(0)
    logits[0, 1, 1] = logits[0, 3, 0] = 5.0
    q, t = HungarianMatcher()({"pred_logits": logits, "pred_boxes": pred},
                              [{"labels": torch.tensor([0, 1]), "boxes": boxes}])[0]
    assert dict(zip(t.tolist(), q.tolist(), strict=True)) == {0: 3, 1: 1}


def test_nan_predictions_raise_a_clear_error():
    out = _outputs()[0]
    out["pred_boxes"][0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        HungarianMatcher()(out, _targets([1, 1]))
