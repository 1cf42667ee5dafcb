"""benchmarks/heldout.py: the sets it generates, the copy it runs in (only ``prepare.source``
and the deps line changed), its overrides and its table. The ``dvc repro`` itself is the
benchmark's (minutes), not a test's."""

import json
import os

import pytest
import yaml

from benchmarks import heldout
from tests.pipelines.project import ROOT, project_env

TINY = {"num_train": 2, "num_val": 1, "image_size": 64, "objects": (1, 2),
        "object_sizes": (8, 20), "background": "texture", "classes": 2, "seed": 0}


def test_subset_scales_the_counts_and_keeps_the_rest():
    small = heldout.settings("B", 0.01)
    assert (small["num_train"], small["num_val"]) == (20, 5)
    assert {k: v for k, v in small.items() if not k.startswith("num_")} == {
        k: v for k, v in heldout.SETS["B"].items() if not k.startswith("num_")}
    assert heldout.settings("A", 0.001)["num_val"] == 1


def test_set_param_reaches_nested_keys_and_names_unknown_ones():
    params = {"train": {"epochs": 12}, "model": {"aids": {"dense": {"boxes": True}}}}
    heldout.set_param(params, "model.aids.dense.boxes", False)
    heldout.set_param(params, "train.epochs", 1)
    assert params == {"train": {"epochs": 1}, "model": {"aids": {"dense": {"boxes": False}}}}
    with pytest.raises(KeyError, match="no train.epoch"):
        heldout.set_param(params, "train.epoch", 1)
    with pytest.raises(KeyError, match="no trian"):
        heldout.set_param(params, "trian.epochs", 1)


def test_a_generated_set_is_reused_when_its_settings_match(tmp_path):
    first = heldout.dataset(tmp_path / "s", TINY, workers=1)
    stamp = (tmp_path / "s" / "annotations" / "train.json").stat().st_mtime_ns
    assert heldout.dataset(tmp_path / "s", TINY, workers=1) == first
    assert (tmp_path / "s" / "annotations" / "train.json").stat().st_mtime_ns == stamp
    heldout.dataset(tmp_path / "s", {**TINY, "num_train": 3}, workers=1)
    assert len(list((tmp_path / "s" / "images" / "train").iterdir())) == 3


def test_the_copy_changes_only_the_source_and_the_deps(tmp_path):
    heldout.dataset(tmp_path / "data", TINY, workers=1)
    root = tmp_path / "copy"
    heldout.make_copy(root, tmp_path / "data", {"train.epochs": 1}, project_env())
    params = yaml.safe_load((root / "params.yaml").read_text())
    mine = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["prepare"]["source"] == "data/raw" and params["train"]["epochs"] == 1
    mine["prepare"]["source"], mine["train"]["epochs"] = "data/raw", 1
    assert params == mine
    prepare = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["prepare"]
    assert "data/raw" in prepare["deps"]
    image = "images/train/000000.jpg"
    assert os.path.samefile(root / "data/raw" / image, tmp_path / "data" / image)
    assert not (root / "data/raw/summary.json").exists()


def test_table_shows_results_and_failures():
    summary = {"image_size": [640, 640], "splits": {
        "train": {"images": 60, "annotations": 1800, "objects_per_image": [20, 40],
                  "box_side_px": [8.9, 40.0]},
        "val": {"images": 20, "annotations": 600, "objects_per_image": [21, 39],
                "box_side_px": [9.0, 39.5]}}}
    ok = {"set": "A", "summary": summary, "seconds": {"train": 300.4, "total": 400.0},
          "metrics": {"AP": 0.25, "AP50": 0.5, "AP_small": 0.2}}
    failed = {"set": "B", "summary": summary, "seconds": {"prepare": 2, "validate": 3,
                                                          "total": 6.0},
              "error": {"stage": "validate", "tail": []}}
    lines = heldout.table([ok, failed]).splitlines()
    assert lines[2] == ("| A | 60 + 20 | 640x640 | 20-40 / image, 9-40 px | 0.250 | 0.500 | "
                        "0.200 | 300 | 400 |")
    assert "failed: validate" in lines[3] and lines[3].endswith("| - | 6 |")
    json.dumps([ok, failed])  # the rows are what --json writes
