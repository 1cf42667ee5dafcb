"""The params logged to MLflow: one param per knob, nested sections included."""

from __future__ import annotations

from pathlib import Path

from detr.config import LIBRARY_SECTIONS, load_params
from pipelines.tracking import flat_params

ROOT = Path(__file__).resolve().parents[2]


def test_every_knob_of_the_demo_params_is_one_mlflow_param():
    logged = flat_params(load_params(ROOT / "params.yaml", LIBRARY_SECTIONS))
    assert logged["train.weight_decay"] == "0.0001"
    assert logged["model.aids.dense.loss_coef"] == "15.0"  # nested aid settings, flattened
    assert logged["model.aids.dense.boxes"] == "True"
    assert logged["model.aids.query_groups"] == "None"  # an aid that is off: one param
    assert logged["data.scales"] == "auto"  # the train stage logs what it resolved to
    assert not [k for k, v in logged.items() if v.startswith(("{", "AidsConfig", "Dense"))]


def test_plain_mappings_flatten_too():
    assert flat_params({"a": {"b": {"c": 1}, "d": {}}, "e": 2}) == {
        "a.b.c": "1", "a.d": "{}", "e": "2"}
