"""The registered model's pyfunc with a segmentation model: a ``masks`` column of COCO RLEs
parallel to ``detections``, declared in the signature; box models keep one column."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from detr.inference import Predictor
from detr.masks_out import rle_decode
from pipelines import mlflow_model
from pipelines.mlflow_model import DetrPyfunc, decode_image, encode_image, model_signature
from tests.fake_segmentation import fake_segmentation


@pytest.fixture(scope="module")
def seg_pyfunc():
    model = DetrPyfunc()
    model.defaults = {"score_threshold": 0.0, "top_k": 3}
    model.predictor = Predictor(fake_segmentation(), scale=64, max_size=96, device="cpu",
                                **model.defaults)
    return model


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pyfunc_masks")
    rng = np.random.default_rng(1)
    texts = []
    for name, (h, w) in {"a.png": (40, 60), "b.png": (72, 36)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        texts.append(encode_image(folder / name))
    return pd.DataFrame({"image": texts})


def test_masks_column_holds_the_rles_of_the_detections(seg_pyfunc, frame):
    out = seg_pyfunc.predict(None, frame)
    assert list(out.columns) == ["detections", "masks"] and len(out) == 2
    images = [decode_image(text) for text in frame["image"]]
    expected = seg_pyfunc.predictor.predict(images)
    for text, masks, image, det in zip(out["detections"], out["masks"], images, expected,
                                       strict=True):
        records, rles = json.loads(text), json.loads(masks)
        assert len(records) == len(rles) == 3
        assert all("segmentation" not in r for r in records)  # boxes as for a box model
        for rle, mask in zip(rles, det.masks, strict=True):
            assert rle["size"] == list(image.shape[-2:])
            assert torch.equal(rle_decode(rle), mask)


def test_a_box_model_keeps_its_single_column(tiny_checkpoint, tmp_path, frame):
    settings = tmp_path / "inference.json"
    settings.write_text(json.dumps(mlflow_model.inference_settings((64, 64))))
    model = DetrPyfunc()
    model.load_context(SimpleNamespace(artifacts={
        mlflow_model.CHECKPOINT_ARTIFACT: str(tiny_checkpoint),
        mlflow_model.INFERENCE_ARTIFACT: str(settings)}))
    assert list(model.predict(None, frame).columns) == ["detections"]


def test_the_signature_declares_the_masks_column():
    assert model_signature().outputs.input_names() == ["detections"]
    assert model_signature(masks=True).outputs.input_names() == ["detections", "masks"]
    assert mlflow_model.has_mask_weights({"model": {"mask_head.lay1.weight": 0}})
    assert not mlflow_model.has_mask_weights({"model": {"class_embed.weight": 0}})


def test_tiling_a_segmentation_model_is_refused_by_name(seg_pyfunc, frame):
    with pytest.raises(ValueError, match="tile"):
        seg_pyfunc.predict(None, frame, params={"tile": "32"})
