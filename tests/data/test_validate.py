"""The validate stage: report, Data Docs, statistics, exit codes and strict params."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest

from detr.config import ConfigError
from pipelines.__main__ import main as pipelines_main
from pipelines.params import ValidateConfig
from pipelines.params import load as load_params
from pipelines.stage import FLOWS_SWITCH
from pipelines.stages.validate import DatasetValidationError, run, validate_flow
from tests.data.conftest import load_split, save_split


def main(argv: list[str]) -> int:
    """``python -m pipelines validate``, run as plain functions: the same output whether or
    not this module's Prefect test server is up (it is after test_flow_fails_..., and tests
    run in random order)."""
    with mock.patch.dict(os.environ, {FLOWS_SWITCH: "0"}):
        return pipelines_main(["validate", *argv])


def _stage_args(
    dataset: Path, tmp_path: Path, params: str = "validate:\n  workers: 1\n"
) -> list[str]:
    (tmp_path / "params.yaml").write_text(params)
    return [
        "--data",
        str(dataset),
        "--params",
        str(tmp_path / "params.yaml"),
        "--reports",
        str(tmp_path / "reports"),
    ]


def test_run_writes_report_docs_and_statistics(pristine_dataset: Path, tmp_path: Path) -> None:
    report = run(
        pristine_dataset,
        ValidateConfig(workers=1),
        tmp_path / "reports",
    )
    assert report.success and report.failed == []
    saved = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert saved["success"] is True
    assert saved["counts"]["failed"] == 0
    assert saved["counts"]["expectations"] == len(saved["expectations"]) == len(report.outcomes)
    assert saved["counts"]["rows"] == {"images": 9, "annotations": 18, "categories": 6}
    assert report.docs_index.is_file()
    assert "image_file_decodes" in _docs_text(report.docs_index.parent)
    stats = json.loads((tmp_path / "reports" / "dataset.json").read_text())
    assert stats == report.statistics
    assert stats["train"]["images"] == 6 and stats["val"]["boxes"] == 6
    assert stats["train"]["per_class"] == {"circle": 4, "square": 4, "triangle": 4}
    # boxes of 320 and 561 px^2: all "small" (< 32^2)
    assert stats["train"]["area"] == {"small": 12, "medium": 0, "large": 0}
    assert stats["val"]["boxes_per_image_max"] == 2


def _docs_text(docs_dir: Path) -> str:
    return "\n".join(p.read_text() for p in docs_dir.rglob("*.html"))


def test_area_histogram_uses_coco_ranges(dataset: Path, tmp_path: Path) -> None:
    data = load_split(dataset, "train")
    areas = [32.0**2 - 1, 32.0**2, 96.0**2 - 1, 96.0**2]
    for ann, area in zip(data["annotations"], areas, strict=False):
        ann["area"] = area
    save_split(dataset, "train", data)
    stats = run(dataset, ValidateConfig(workers=1, area_tolerance=100.0), tmp_path).statistics
    assert stats["train"]["area"] == {"small": 9, "medium": 2, "large": 1}


def test_main_passes_on_valid_data(pristine_dataset: Path, tmp_path: Path, capsys) -> None:
    assert main(_stage_args(pristine_dataset, tmp_path)) == 0
    assert "expectations passed" in capsys.readouterr().out
    assert (tmp_path / "reports" / "dataset.json").is_file()


def test_main_fails_naming_expectation_and_record(dataset: Path, tmp_path: Path, capsys) -> None:
    (dataset / "images" / "val" / "img_008.png").unlink()
    data = load_split(dataset, "train")
    data["annotations"][0]["iscrowd"] = 7
    save_split(dataset, "train", data)
    assert main(_stage_args(dataset, tmp_path)) == 1
    err = capsys.readouterr().err
    assert "FAILED images.image_file_exists" in err and "file_name=img_008.png" in err
    assert "FAILED annotations.annotation_iscrowd_0_or_1" in err and "split=train, id=1" in err
    saved = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert saved["success"] is False
    assert saved["failed"] == ["image_file_exists", "annotation_iscrowd_0_or_1"]
    failed = {e["name"]: e for e in saved["expectations"] if not e["success"]}
    assert failed["image_file_exists"]["examples"] == [
        {"exists": False, "split": "val", "id": 8, "file_name": "img_008.png"}
    ]


def test_main_says_which_params_key_to_set(dataset: Path, tmp_path: Path, capsys) -> None:
    params = "validate:\n  workers: 1\nmodel:\n  num_queries: 2\n"
    (dataset / "images" / "val" / "img_008.png").unlink()
    assert main(_stage_args(dataset, tmp_path, params)) == 1
    err = capsys.readouterr().err
    assert ("FAILED images.boxes_per_image_below_num_queries (expect_column_values_to_be_between)"
            ": 9/9 records\n") in err
    assert ("    to pass: set model.num_queries >= 3 (the most boxes in one image is 2; "
            "validate.num_queries, if set, too)\n") in err
    assert "    to pass: fix the data: add the listed image files under images/<split>/" in err
    saved = json.loads((tmp_path / "reports" / "validation.json").read_text())
    fixes = {e["name"]: e["fix"] for e in saved["expectations"]}
    assert fixes["boxes_per_image_below_num_queries"].startswith("set model.num_queries >= 3")
    assert fixes["image_file_decodes"] is None  # passed: nothing to fix


@pytest.mark.parametrize("params", ["validate:\n  num_querys: 5\n", "validate:\n  workers: two\n"])
def test_main_rejects_bad_params(
    pristine_dataset: Path, tmp_path: Path, params: str, capsys
) -> None:
    assert main(_stage_args(pristine_dataset, tmp_path, params)) == 2
    assert "validate." in capsys.readouterr().err


def test_main_names_a_missing_annotation_file(dataset: Path, tmp_path: Path, capsys) -> None:
    (dataset / "annotations" / "val.json").unlink()
    assert main(_stage_args(dataset, tmp_path)) == 2
    assert "val.json: annotation file not found" in capsys.readouterr().err


def test_load_params_is_strict_and_defaults_a_missing_section(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\nmodel:\n  num_queries: 7\n")
    assert load_params(path)["validate"] == ValidateConfig(num_queries=7)  # from model
    path.write_text("validate:\n  box_tolerance_px: 2\n  max_boxes_per_image: 1.5\n")
    with pytest.raises(ConfigError, match="validate.max_boxes_per_image"):
        load_params(path)
    with pytest.raises(ConfigError, match="No such file"):
        load_params(tmp_path / "nope.yaml")


def test_flow_fails_naming_the_expectation(dataset: Path, tmp_path: Path,
                                            prefect_server) -> None:
    """As a real Prefect flow run: Completed with the statistics, or Failed with a message
    that names the failed expectation and its records."""
    stats = validate_flow(dataset_dir=dataset, params=ValidateConfig(workers=1),
                          report_dir=tmp_path / "ok")
    assert stats["train"]["boxes"] == 12
    state = validate_flow(dataset_dir=dataset, params=ValidateConfig(workers=1, num_queries=2),
                          report_dir=tmp_path / "bad", return_state=True)
    assert state.is_failed()
    assert "boxes_per_image_below_num_queries" in state.message
    with pytest.raises(DatasetValidationError, match="img_001.png"):
        state.result()


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"workers": 0}, "workers"),
        ({"min_boxes_per_image": 5, "max_boxes_per_image": 4}, "max_boxes_per_image"),
        ({"min_class_fraction": 1.5}, "min_class_fraction"),
    ],
)
def test_config_ranges_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"validate.{key}: .* out of range"):
        ValidateConfig(**overrides)
