"""evaluate.tile: the val split measured on whole images with tiled prediction."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from pipelines.measurement import COCO_MAX_DETS, measure
from pipelines.params import EvaluateConfig, EvaluateTileConfig, TileConfig
from pipelines.stages import evaluate
from pipelines.stages.prepare import tile_dataset
from tests.conftest import tiny_training

PLAIN = EvaluateConfig(batch_size=4, num_examples=1, attention_images=1, attention_queries=2)
TILED = dataclasses.replace(PLAIN, tile=EvaluateTileConfig(size=32, overlap=0.25))


def _measure(checkpoint, dataset, cfg):
    _, _, data, train = tiny_training()
    return measure(checkpoint, dataset, cfg=cfg, data_cfg=data, train_cfg=train)


@pytest.fixture(scope="module")
def tiled_dataset(tiny_dataset, tmp_path_factory):
    """The tiny dataset (64 px) with every image cut into 32 px tiles."""
    root = tmp_path_factory.mktemp("tiled") / "dataset"
    shutil.copytree(tiny_dataset, root)
    tile_dataset(root, TileConfig(size=32, overlap=0.25, min_image_side=32, min_visible=0.5))
    return root


def test_tiled_measurement_scores_whole_images(tiny_checkpoint, tiled_dataset):
    measured = _measure(tiny_checkpoint, tiled_dataset, TILED)
    whole = json.loads((tiled_dataset / "annotations" / "val_whole.json").read_text())
    assert measured.tiled and measured.val.ann_file.name == "val_whole.json"
    assert sorted(measured.predictions) == sorted(im["id"] for im in whole["images"])
    assert measured.evaluation.num_images == len(whole["images"])
    for image_id, det in measured.predictions.items():
        record = measured.val.coco.imgs[image_id]
        height, width = record["height"], record["width"]
        assert 0 < len(det["scores"]) <= COCO_MAX_DETS
        assert (det["boxes"][:, 2] <= width).all() and (det["boxes"][:, 3] <= height).all()
    plain = _measure(tiny_checkpoint, tiled_dataset, PLAIN)  # the tiles, as training saw them
    assert plain.evaluation.num_images == 3 * 3 * len(whole["images"])


def test_a_tile_as_large_as_the_image_gives_the_untiled_ap(tiny_checkpoint, tiny_dataset):
    auto = dataclasses.replace(PLAIN, tile=EvaluateTileConfig(size="auto"))  # 64: the images
    tiled = _measure(tiny_checkpoint, tiny_dataset, auto)
    plain = _measure(tiny_checkpoint, tiny_dataset, PLAIN)
    assert tiled.evaluation.stats == pytest.approx(plain.evaluation.stats, abs=2e-3)


def test_the_stage_reports_a_tiled_evaluation(tiny_checkpoint, tiled_dataset, tmp_path):
    _, _, data, train = tiny_training()
    evaluate.run(checkpoint=tiny_checkpoint, dataset_dir=tiled_dataset, cfg=TILED,
                 data_cfg=data, train_cfg=train, metrics_path=tmp_path / "coco.json",
                 plots_dir=tmp_path / "plots", report_dir=tmp_path / "report", run_file=None)
    assert "AP" in json.loads((tmp_path / "coco.json").read_text())
    assert not (tmp_path / "report" / "figures" / "query_specialisation.png").exists()
    assert "tiled prediction" in (tmp_path / "report" / "report.html").read_text()
