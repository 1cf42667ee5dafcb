"""detr.inference: the Predictor's detection contract, input kinds, batching, constructors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from detr import hub
from detr.checkpoint import CheckpointError, load_file
from detr.data.coco import ImageLoadError
from detr.inference import (
    COCO_CATEGORY_NAMES,
    Detections,
    Predictor,
    _inference_precision,
    load_image,
)
from detr.train import fit
from tests.conftest import TINY, tiny_training

# The official architecture (frozen BN, 91 classes) at the size of TINY.
TINY_OFFICIAL = {k: v for k, v in dataclasses.asdict(TINY).items()
                 if k in ("backbone", "hidden_dim", "nheads", "enc_layers", "dec_layers",
                          "dim_feedforward", "dropout", "num_queries")}


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory):
    """A training checkpoint of a tiny model after one epoch on the tiny dataset."""
    model, loss, data, train = tiny_training(epochs=1)
    result = fit(model_cfg=model, loss_cfg=loss, data_cfg=data, train_cfg=train,
                 data_root=tiny_dataset, out_dir=tmp_path_factory.mktemp("ckpt"),
                 progress=False, evaluate_at_end=False)
    return result.checkpoint


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_checkpoint(checkpoint, device="cpu", score_threshold=0.0)


@pytest.fixture(scope="module")
def val_images(tiny_dataset):
    return sorted((tiny_dataset / "images" / "val").glob("*.jpg"))


def _pictures(val_images) -> list[Image.Image]:
    """Pictures of three sizes (square, wide, tall), so a batch needs padding."""
    first = Image.open(val_images[0]).convert("RGB")
    return [first, first.resize((80, 48)), Image.open(val_images[1]).convert("RGB").resize((40, 72))]


def _assert_same(a: Detections, b: Detections, atol: float = 1e-4) -> None:
    assert a.labels.tolist() == b.labels.tolist() and a.names == b.names
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=0)
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol, rtol=0)


def test_detections_contract_for_images_of_different_sizes(predictor, checkpoint, val_images):
    categories = load_file(checkpoint)["label_map"]["categories"]
    names = {c["id"]: c["name"] for c in categories}
    pictures = _pictures(val_images)
    detections = predictor.predict(pictures)
    assert len(detections) == len(pictures)
    for det, picture in zip(detections, pictures, strict=True):
        width, height = picture.size
        assert det.image_size == (height, width)
        assert len(det) == TINY.num_queries  # threshold 0 keeps every query
        assert det.boxes.shape == (len(det), 4) and det.boxes.dtype == torch.float32
        assert (det.boxes[:, 0::2] >= 0).all() and (det.boxes[:, 0::2] <= width).all()
        assert (det.boxes[:, 1::2] >= 0).all() and (det.boxes[:, 1::2] <= height).all()
        assert (det.boxes[:, 2:] >= det.boxes[:, :2]).all()
        assert det.scores.tolist() == sorted(det.scores.tolist(), reverse=True)
        assert det.names == [names[c] for c in det.labels.tolist()]


def test_threshold_and_top_k_are_honoured(predictor, val_images):
    full = predictor.predict(val_images[0])[0]
    threshold = float(full.scores[len(full) // 2])
    kept = predictor.predict(val_images[0], score_threshold=threshold)[0]
    assert len(kept) == int((full.scores >= threshold).sum()) and (kept.scores >= threshold).all()
    top = predictor.predict(val_images[0], top_k=3)[0]
    assert len(top) == 3
    _assert_same(top, Detections(full.boxes[:3], full.scores[:3], full.labels[:3],
                                 full.names[:3], full.image_size), atol=0)
    assert len(predictor.predict(val_images[0], score_threshold=1.0)[0]) == 0


def test_a_path_a_pil_image_and_a_tensor_give_the_same_detections(predictor, val_images):
    path = val_images[0]
    pil = Image.open(path)
    tensor = F.pil_to_tensor(pil.convert("RGB"))
    by_path, by_pil, by_tensor = predictor.predict([path, pil, tensor])
    _assert_same(by_path, by_pil, atol=0)
    _assert_same(by_path, by_tensor, atol=0)


def test_batched_equals_one_by_one(predictor, val_images):
    pictures = _pictures(val_images)
    batched = predictor.predict(pictures, batch_size=len(pictures))
    for picture, together in zip(pictures, batched, strict=True):
        _assert_same(predictor.predict([picture], batch_size=1)[0], together)


def test_from_checkpoint_takes_the_val_resize_from_the_data_params(checkpoint, predictor):
    data = load_file(checkpoint)["params"]["data"]
    assert (predictor.scale, predictor.max_size) == (max(data["scales"]), data["max_size"])
    assert predictor.precision == "fp32"  # auto: no bf16 unless asked for
    other = Predictor.from_checkpoint(checkpoint, device="cpu", scale=48, max_size=96)
    assert (other.scale, other.max_size) == (48, 96)


def test_auto_precision_is_fp32_on_every_device(monkeypatch):
    # bf16 autocast measured slower than fp32 for batch-2 inference on H100 and H200 GPUs.
    # Pretend every device has fast bf16, as a GPU does, so "auto" has a choice to make here.
    monkeypatch.setattr("detr.device.bf16_supported", lambda device: True)
    for device in ("cpu", "cuda", "cuda:1"):
        assert _inference_precision("auto", torch.device(device)) == "fp32"
    assert _inference_precision("bf16", torch.device("cuda")) == "bf16"  # when asked for
    assert _inference_precision("fp32", torch.device("cuda")) == "fp32"
    with pytest.raises(ValueError, match="not one of"):
        _inference_precision("fp16", torch.device("cpu"))


def test_from_official_reads_an_official_format_file(tmp_path, val_images):
    model = hub.detr_resnet50(pretrained=False, **TINY_OFFICIAL)
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict()}, path)
    predictor = Predictor.from_official(path, device="cpu", scale=64, max_size=64,
                                        score_threshold=0.0, model_overrides=TINY_OFFICIAL)
    loaded = predictor.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    det = predictor.predict(val_images[0])[0]
    assert len(det) == TINY_OFFICIAL["num_queries"]
    assert ((det.labels >= 0) & (det.labels < hub.COCO_NUM_CLASSES)).all()
    assert det.names == [COCO_CATEGORY_NAMES[c] for c in det.labels.tolist()]


def test_from_official_rejects_an_unknown_backbone():
    with pytest.raises(ValueError, match="resnet18"):
        Predictor.from_official(False, backbone="resnet18")


def test_coco_category_table():
    assert len(COCO_CATEGORY_NAMES) == hub.COCO_NUM_CLASSES == 91
    used = [n for n in COCO_CATEGORY_NAMES if n != "N/A"]
    assert len(used) == len(set(used)) == 80
    assert COCO_CATEGORY_NAMES[0] == "N/A" and COCO_CATEGORY_NAMES[1] == "person"
    assert COCO_CATEGORY_NAMES[12] == "N/A" and COCO_CATEGORY_NAMES[90] == "toothbrush"


def test_to_coco_and_to_json(predictor, val_images):
    det = predictor.predict(val_images[0], top_k=2)[0]
    results = det.to_coco(7)
    assert [r["image_id"] for r in results] == [7, 7]
    x1, y1, x2, y2 = det.boxes[0].tolist()
    assert results[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert results[0]["category_id"] == int(det.labels[0])
    records = json.loads(det.to_json())
    assert [r["category"] for r in records] == det.names
    assert records[0]["score"] == pytest.approx(float(det.scores[0]), abs=1e-5)


def test_unreadable_images_are_named(predictor, tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        predictor.predict([missing])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="broken.png"):
        predictor.predict(broken)
    with pytest.raises(ValueError, match="image 1"):
        predictor.predict([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(8, 8)])
    with pytest.raises(ValueError, match="score_threshold"):
        predictor.predict([missing], score_threshold=1.5)


def test_grey_and_float_tensors_are_accepted():
    grey = load_image(torch.zeros(1, 5, 6, dtype=torch.uint8))
    assert grey.shape == (3, 5, 6) and grey.dtype == torch.uint8
    assert load_image(torch.rand(3, 5, 6, dtype=torch.float64)).dtype == torch.float32


def test_a_file_that_is_not_a_training_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="weights.pth"):
        Predictor.from_checkpoint(path, device="cpu")


def test_nms_keeps_one_box_per_object_and_class(checkpoint, val_images):
    from torchvision.ops import box_iou

    plain = Predictor.from_checkpoint(checkpoint, device="cpu", score_threshold=0.0)
    nms = Predictor.from_checkpoint(checkpoint, device="cpu", score_threshold=0.0, nms=0.6)
    for before, after in zip(plain.predict(val_images), nms.predict(val_images), strict=True):
        assert 0 < len(after.boxes) <= len(before.boxes)
        same = after.labels[:, None] == after.labels[None, :]
        overlap = (box_iou(after.boxes, after.boxes) > 0.6) & same
        assert not overlap.fill_diagonal_(False).any()
        assert after.scores[0] == before.scores[0]  # the best box always stays
    with pytest.raises(ValueError, match="nms: 1.5"):
        Predictor.from_checkpoint(checkpoint, device="cpu", nms=1.5)
