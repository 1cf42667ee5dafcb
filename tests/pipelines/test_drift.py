"""Data drift: the profile of a dataset, the table against the champion's, the optional gate.

Two hand-made datasets whose statistics are known give the table's numbers exactly; the register
stage, on the fixed predictors of tests/pipelines/registry_fixtures.py, stores each version's
profile and compares today's data with the champion's.
"""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from pipelines.params import DriftConfig
from pipelines.registry import drift
from pipelines.registry.profile import dataset_profile
from pipelines.stages import register
from tests.pipelines.registry_fixtures import (
    dataset_version,
    decision_registry,
    fixed_predictor,
    register_on,
)

V1 = [("P", "a")] * 4
V2 = [("Q", "b")] * 3 + [("P", "a")]  # class balance a 100% -> a 25%, b 75%


def _dataset(root, *, size: int, red: int, boxes: list[tuple[str, float]]) -> object:
    """4 val images ``size`` px square, left half (red, 50, 50), right half black, each with
    ``boxes`` ((class, side px) squares)."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i in range(1, 5):
        image = Image.new("RGB", (size, size))
        image.paste((red, 50, 50), (0, 0, size // 2, size))
        image.save(root / "images" / "val" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
        annotations += [{"id": len(annotations) + 1, "image_id": i, "category_id": 1 + (c == "b"),
                         "bbox": [0, 0, side, side], "area": side * side, "iscrowd": 0}
                        for c, side in boxes]
    (root / "annotations" / "val.json").write_text(json.dumps(
        {"images": images, "annotations": annotations,
         "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return root


def test_the_drift_table_on_two_known_datasets(tmp_path):
    old = dataset_profile(_dataset(tmp_path / "old", size=64, red=100, boxes=[("a", 16)]))
    new = dataset_profile(_dataset(tmp_path / "new", size=128, red=200,
                                   boxes=[("a", 32), ("b", 32)]))
    assert old["class_balance"] == {"a": 4} and new["class_balance"] == {"a": 4, "b": 4}
    assert old["boxes_per_image"][1] == 4 and new["boxes_per_image"][2] == 4
    assert (old["box_size"]["mean"], new["image_size"]["mean_width"]) == (16.0, 128.0)
    # half red, half black: the mean is half the red, the std too (50 each channel: G, B)
    assert old["colour"] == {"sampled": 4, "mean": [50.0, 25.0, 25.0],
                             "std": [50.0, 25.0, 25.0]}
    rows = {r["statistic"]: r for r in drift.compare(new, old, DriftConfig())}
    # class balance [1, 0] vs [1/2, 1/2]: JS divergence H([3/4, 1/4]) - (0 + 1) / 2 (bits)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert rows["class_balance"]["distance"] == pytest.approx(math.sqrt(h - 0.5), abs=1e-4)
    for name in ("boxes_per_image", "box_size", "image_size"):  # nothing in common: 1
        assert rows[name]["distance"] == 1.0 and rows[name]["drifted"], name
    assert rows["colour"]["distance"] == pytest.approx(1.0, abs=0.02)  # red mean 50 -> 100
    assert rows["colour"]["drifted"] and rows["class_balance"]["drifted"]
    assert rows["class_balance"]["champion"] == "a 100%"
    assert rows["class_balance"]["new"] == "a 50%, b 50%"
    assert rows["image_size"]["new"] == "mean 128 x 128 px"
    same = drift.compare(old, old, DriftConfig())
    assert all(r["distance"] == 0.0 and not r["drifted"] for r in same)
    table = drift.drift_markdown({"champion_version": 3, "gate": False, "rows": list(rows.values())})
    assert "| class balance | Jensen-Shannon distance | a 100% | a 50%, b 50% | 0.5579 | 0.2 |" \
        " **yes** |" in table
    assert "champion v3" in table and "gate off" in table


def test_thresholds_and_empty_histograms():
    assert drift.js_distance([0, 0], [0, 0]) == 0.0 and drift.js_distance([1, 0], [0, 0]) == 1.0
    assert drift.js_distance({"a": 2}, {"a": 5}) == 0.0
    lenient = DriftConfig(class_balance=0.6)
    assert lenient.class_balance == 0.6
    with pytest.raises(Exception, match="register.drift.box_size"):
        DriftConfig(box_size=1.5)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with decision_registry(tmp_path_factory.mktemp("drift")) as env:
        yield env


@pytest.mark.parametrize("gate", [False, True])
def test_register_compares_todays_data_with_the_champions(registry, gate):
    """Q-detecting-b beats P-detecting-a on V2 (0.5 vs 0.125), but the class balance moved."""
    name = f"drift-gate-{gate}"
    qb = fixed_predictor(registry.root / "qb.pth", "Q", "b")
    rule = {"max_class_drop": 1.0, "drift": DriftConfig(gate=gate)}
    first = register_on(registry, name, registry.P, dataset_version(registry, f"{name}1", V1),
                        **rule)
    assert first["drift"]["note"] == "no champion to compare with"
    tags = registry.client.get_model_version(name, "1").tags
    assert tags["drift"] == "not measured"
    assert tags["data_profile"] == f"data_profile/profile-{name + '1':0>32}.json"  # md5
    report = register_on(registry, name, qb, dataset_version(registry, f"{name}2", V2), **rule)
    assert report["value"] > report["champion_value_before"]
    assert report["drift"]["drifted"] == ["class_balance"]
    assert report["decision"] == ("challenger" if gate else "champion")
    if gate:
        assert "drifted from the champion's (class_balance past register.drift)" \
            in report["reason"]
    assert registry.client.get_model_version(name, "2").tags["drift"] == "class_balance"
    run = registry.client.get_run(report["run_id"])
    # [1, 0] vs [1/4, 3/4]: sqrt(H([5/8, 3/8]) - H([1/4, 3/4]) / 2) = sqrt(0.9544 - 0.4056)
    assert run.data.metrics["drift_class_balance"] == pytest.approx(0.7408, abs=1e-4)
    assert run.data.metrics["drift_image_size"] == 0.0
    import mlflow

    logged = mlflow.artifacts.load_text(f"runs:/{report['run_id']}/{drift.TABLE_ARTIFACT}")
    assert "| class balance | Jensen-Shannon distance | a 100% | b 75%, a 25% | 0.7408" in logged
    assert logged in register.report_markdown(report)  # the Prefect artifact and the card
    assert "  data drift: class balance: Jensen-Shannon distance 0.7408 > " \
        "register.drift.class_balance 0.2" in register.summary(report)
