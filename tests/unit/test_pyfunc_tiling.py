"""The registered model's pyfunc takes the tiling options as predict-time params."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from pipelines import mlflow_model
from pipelines.mlflow_model import TILE_PARAMS, DetrPyfunc, encode_image, model_signature
from tests.conftest import tiny_training


@pytest.fixture(scope="module")
def pyfunc(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pyfunc")
    _, _, data, _ = tiny_training()
    settings = folder / "inference.json"
    settings.write_text(json.dumps(mlflow_model.inference_settings((max(data.scales), data.max_size))))
    model = DetrPyfunc()
    model.load_context(SimpleNamespace(artifacts={
        mlflow_model.CHECKPOINT_ARTIFACT: str(tiny_checkpoint),
        mlflow_model.INFERENCE_ARTIFACT: str(settings)}))
    return model


@pytest.fixture(scope="module")
def frame(tiny_dataset, tmp_path_factory):
    val = sorted((tiny_dataset / "images" / "val").glob("*.jpg"))[0]
    big = tmp_path_factory.mktemp("big") / "big.png"
    with Image.open(val) as image:
        image.convert("RGB").resize((160, 96)).save(big)
    return pd.DataFrame({"image": [encode_image(big)]})


def test_tiled_params_keep_the_output_contract(pyfunc, frame):
    params = {"score_threshold": 0.0, "top_k": 7, "tile": "48", "overlap": 0.25,
              "tile_whole": True, "merge": "iou", "merge_threshold": 0.6, "fuse": True}
    dets = json.loads(pyfunc.predict(None, frame, params=params)["detections"][0])
    assert 0 < len(dets) <= 7
    for det in dets:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 96
    auto = json.loads(pyfunc.predict(None, frame, params={"tile": "auto", "score_threshold": 0.0,
                                                          "top_k": 3})["detections"][0])
    assert len(auto) == 3


def test_tile_off_is_the_plain_prediction(pyfunc, frame):
    plain = pyfunc.predict(None, frame, params={"score_threshold": 0.0})
    off = pyfunc.predict(None, frame, params={"score_threshold": 0.0, "tile": ""})
    assert plain.equals(off)


@pytest.mark.parametrize(("params", "culprit"), [({"tile": "big"}, "tile"),
                                                 ({"tile": "64", "overlap": 1.0}, "overlap"),
                                                 ({"tile": "64", "merge": "giou"}, "match")])
def test_bad_tiling_params_are_named(pyfunc, frame, params, culprit):
    with pytest.raises(ValueError, match=culprit):
        pyfunc.predict(None, frame, params=params)


def test_the_signature_lists_the_tiling_params():
    names = {p.name: p.default for p in model_signature().params.params}
    assert {k: names[k] for k in TILE_PARAMS} == TILE_PARAMS
