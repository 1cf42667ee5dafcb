"""python -m detr.predict with a segmentation model: COCO RLE per detection (decodes to the
predicted mask), translucent masks drawn under the boxes, panoptic PNGs, --tile refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from detr import predict as cli
from detr.inference import Predictor, load_image
from detr.masks_out import rle_decode
from detr.visualize import MASK_ALPHA, class_color, draw_detections
from tests.fake_segmentation import fake_segmentation


@pytest.fixture(scope="module")
def predictor():
    return Predictor(fake_segmentation(), scale=64, max_size=96, device="cpu",
                     score_threshold=0.0, top_k=4, stuff_ids=[2])


@pytest.fixture
def photos(tmp_path):
    """Two random pictures of different sizes."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (48, 64), "b.png": (70, 40)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def use_fake(monkeypatch, predictor):
    monkeypatch.setattr(cli, "load_predictor", lambda spec, **options: predictor)


def test_json_rle_decodes_to_the_predicted_masks(use_fake, predictor, photos, tmp_path):
    out = tmp_path / "out"
    assert cli.main([str(photos), "--model", "seg.pth", "--out", str(out),
                     "--score-threshold", "0"]) == 0
    content = json.loads((out / "detections.json").read_text())
    assert "panoptic" not in content
    found = predictor.predict([load_image(image["path"]) for image in content["images"]])
    for image, expected in zip(content["images"], found, strict=True):  # the same batch
        rows = [d for d in content["detections"] if d["image_id"] == image["id"]]
        assert len(rows) == len(expected) == 4
        for row, mask in zip(rows, expected.masks, strict=True):
            assert row["segmentation"]["size"] == [image["height"], image["width"]]
            assert torch.equal(rle_decode(row["segmentation"]), mask)
        assert (out / image["drawing"]).is_file()


def test_panoptic_png_holds_the_segment_ids(use_fake, photos, tmp_path):
    out = tmp_path / "out"
    assert cli.main([str(photos), "--model", "seg.pth", "--out", str(out), "--panoptic"]) == 0
    content = json.loads((out / "detections.json").read_text())
    assert [p["image_id"] for p in content["panoptic"]] == [0, 1]
    for entry, image in zip(content["panoptic"], content["images"], strict=True):
        rgb = np.asarray(Image.open(out / entry["file_name"]), dtype=np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
        assert ids.shape == (image["height"], image["width"])
        for segment in entry["segments_info"]:
            assert (ids == segment["id"]).sum() == segment["area"]
        assert set(np.unique(ids)) <= {0, *(s["id"] for s in entry["segments_info"])}


def test_tiling_masks_exits_2_and_names_the_option(use_fake, photos, tmp_path, capsys):
    assert cli.main([str(photos), "--model", "seg.pth", "--out", str(tmp_path / "o"),
                     "--tile", "32"]) == 2
    assert "tile" in capsys.readouterr().err


def test_masks_are_painted_translucent_under_the_boxes():
    image = torch.full((3, 40, 40), 100, dtype=torch.uint8)
    masks = torch.zeros(1, 40, 40, dtype=torch.bool)
    masks[0, 15:25, 15:25] = True
    drawn = F.pil_to_tensor(draw_detections(image, [[5, 5, 35, 35]], [3], [0.9], masks=masks))
    colour = torch.tensor(class_color(3), dtype=torch.float32)
    blended = (100 * (1 - MASK_ALPHA) + colour * MASK_ALPHA).round()
    assert torch.allclose(drawn[:, 20, 20].float(), blended, atol=1)
    assert (drawn[:, 30, 30] == 100).all()  # inside the box, outside the mask: untouched
    assert torch.equal(drawn[:, 20, 5], torch.tensor(class_color(3), dtype=torch.uint8))
    plain = F.pil_to_tensor(draw_detections(image, [[5, 5, 35, 35]], [3], [0.9]))
    assert torch.equal(plain[:, ~masks[0]], drawn[:, ~masks[0]])  # the rest: as without masks


def test_masks_follow_the_score_threshold_and_must_fit_the_image():
    image = torch.zeros((3, 20, 20), dtype=torch.uint8)
    masks = torch.ones(2, 20, 20, dtype=torch.bool)
    drawn = F.pil_to_tensor(draw_detections(image, [[0, 0, 5, 5], [0, 0, 5, 5]], [1, 2],
                                            [0.9, 0.1], masks=masks, score_threshold=0.5))
    assert (drawn[:, 15, 15].float() - torch.tensor(class_color(1)) * MASK_ALPHA).abs().max() <= 1
    with pytest.raises(ValueError, match="masks"):
        draw_detections(image, [[0, 0, 5, 5]], [1], [0.9], masks=masks)
