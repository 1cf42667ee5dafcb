"""The registry's decisions on real measurements: like for like, floors, the per-class gate.

The models are fixed predictors on hand-made val splits (tests/pipelines/registry_fixtures.py),
so each AP is known; the register stage measures the champion again on today's split with the
evaluate stage's code, and decides. The registry is SQLite under a temporary folder; each test
uses its own model name.
"""

from __future__ import annotations

import json

import pytest

from pipelines.params import RegisterConfig
from pipelines.stages import register
from tests.pipelines.registry_fixtures import (
    dataset_version,
    decision_registry,
    fixed_predictor,
    register_on,
    untrained,
)

pytestmark = pytest.mark.slow
V1 = [("P", "a")] * 4  # the fixed predictor at P scores 1.0 here, the one at Q 0.0
V2 = [("Q", "a")] * 3 + [("P", "a")]  # harder for P: 0.064; Q: 0.75
V2_REVERSED = [("P", "a"), ("P", "a"), ("Q", "a"), ("P", "a")]  # P: 0.69; Q: 0.086


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite registry and a pipeline run under one tmp folder (the working directory and
    DVC_ROOT); the fixed predictors at P and Q, detecting class a."""
    with decision_registry(tmp_path_factory.mktemp("decisions")) as env:
        yield env


def _champion(env, name: str) -> str | None:
    version = register.alias_version(env.client, name, register.CHAMPION)
    return None if version is None else str(version.version)


def test_a_lower_logged_ap_on_harder_data_beats_the_champion_measured_on_it(registry):
    v1, v2 = dataset_version(registry, "v1", V1), dataset_version(registry, "v2", V2)
    first = register_on(registry, "like", registry.P, v1)
    assert (first["decision"], first["value"]) == ("champion", pytest.approx(1.0))
    second = register_on(registry, "like", registry.Q, v2)
    assert second["value"] == pytest.approx(0.7525, abs=1e-3)  # lower than the champion's
    assert second["value"] < second["champion_value_logged"]     # number as it was logged
    assert second["champion_value_logged"] == pytest.approx(1.0)
    assert second["champion_value_before"] == pytest.approx(0.0644, abs=1e-3)
    assert (second["decision"], second["champion_measurement"]) == ("champion", "measured")
    assert (second["dataset_md5"], second["champion_dataset_md5"]) == (v2.md5, v1.md5)
    assert second["per_class"] == {"a": {"new": pytest.approx(0.7525, abs=1e-3),
                                         "champion": pytest.approx(0.0644, abs=1e-3)},
                                   "b": {"new": None, "champion": None}}
    assert _champion(registry, "like") == "2"
    tags = registry.client.get_model_version("like", "2").tags
    assert float(tags["champion_value_before"]) == pytest.approx(0.0644, abs=1e-3)
    assert (float(tags["champion_value_logged"]), tags["champion_dataset_md5"],
            tags["dataset_md5"]) == (1.0, v1.md5, v2.md5)
    [cached] = (registry.root / "reports" / "champion_eval").glob(f"like-v1-{v2.md5}-*.json")
    assert json.loads(cached.read_text())["stats"]["AP"] == pytest.approx(0.0644, abs=1e-3)
    markdown = register.report_markdown(second)
    assert "0.0644" in markdown and "1.0000" in markdown and v1.md5 in markdown


def test_a_higher_logged_ap_that_loses_on_the_same_data_stays_challenger(registry):
    old, new = dataset_version(registry, "r1", V2), dataset_version(registry, "r2", V2_REVERSED)
    assert register_on(registry, "reverse", registry.P, old)["decision"] == "champion"
    second = register_on(registry, "reverse", registry.Q, new)
    assert second["value"] > second["champion_value_logged"]  # 0.086 > 0.064 as logged...
    assert second["champion_value_before"] == pytest.approx(0.6906, abs=1e-3)  # ...not today
    assert second["decision"] == "challenger"
    assert "does not beat the champion's 0.6906" in second["reason"]
    assert _champion(registry, "reverse") == "1"
    again = register_on(registry, "reverse", registry.Q, new)  # same champion, same data
    assert (again["champion_measurement"], again["decision"]) == ("cached", "challenger")


def test_an_untrained_model_is_never_champion_with_the_default_params(registry):
    today = dataset_version(registry, "u", V1)
    report = register_on(registry, "untrained", untrained(registry.root / "u.pth"), today)
    assert report["value"] < RegisterConfig().min_ap
    assert report["decision"] == "challenger"
    assert "below register.min_ap" in report["reason"]
    assert _champion(registry, "untrained") is None
    assert register.summary(report).splitlines()[1].startswith("  why: AP 0.0000 is below")


@pytest.mark.parametrize(("max_class_drop", "expected"), [(0.1, "challenger"),
                                                          (0.3, "champion")])
def test_no_class_may_lose_more_than_max_class_drop(registry, max_class_drop, expected):
    """Q-detecting-b beats P-detecting-a overall (0.5 vs 0.125) but class a loses 0.25."""
    name = f"gate-{expected}"
    today = dataset_version(registry, name, [("Q", "b")] * 3 + [("P", "a")])
    qb = fixed_predictor(registry.root / "qb.pth", "Q", "b")
    assert register_on(registry, name, registry.P, today,
                     max_class_drop=max_class_drop)["decision"] == "champion"
    report = register_on(registry, name, qb, today, max_class_drop=max_class_drop)
    assert report["value"] > report["champion_value_before"]
    assert report["decision"] == expected
    if expected == "challenger":
        assert report["reason"] == ("class 'a' loses 0.2500 AP against the champion (more "
                                    "than register.max_class_drop 0.1)")


def test_every_version_gets_a_model_card(registry):
    import mlflow

    today = dataset_version(registry, "card", V2)
    (registry.root / "reports" / "validation").mkdir(parents=True, exist_ok=True)
    (registry.root / "reports" / "validation" / "dataset.json").write_text(json.dumps({
        "categories": 2, "val": {"images": 4, "boxes": 4, "area": {"small": 4, "medium": 0,
                                                                    "large": 0},
                                 "per_class": {"a": 4}}}))
    (registry.root / "reports" / "validation").mkdir(parents=True, exist_ok=True)
    (registry.root / "reports" / "validation" / "validation.json").write_text(json.dumps(
        {"success": True, "counts": {"expectations": 12, "passed": 12}, "failed": []}))
    report = register_on(registry, "carded", registry.P, today)
    card = registry.client.get_model_version("carded", "1").description
    for text in ("# Model card: carded version 1", "**What it detects:** a, b (2 classes)",
                 f"`{today.md5}`", "| val | 4 | 4 | 4 | 0 | 0 |", "| a | 4 |",
                 "git commit", "suite passed: 12 of 12", "| AP | 0.0644 |", "| a | 0.0644 |",
                 "| small | 0.0644 |", "no champion before", "weakest classes: a (AP 0.064)",
                 "weakest object size: small", "not measured (no val objects): b",
                 "mlflow models serve -m models:/carded/1"):
        assert text in card, text
    assert report["model_card"] == "model_card/carded-v1.html"
    page = mlflow.artifacts.load_text(f"runs:/{report['run_id']}/{report['model_card']}")
    assert "<h1>Model card: carded version 1</h1>" in page and "<table>" in page
