"""Official panoptic key names and shapes, hub entry points, box checkpoints into the
segmentation model, segmentation checkpoints back."""

import dataclasses

import pytest
import torch

import detr
from detr.config import to_dict
from detr.hub import load_detector_weights, model_from_checkpoint
from detr.models.detr import build_model
from detr.models.segmentation import DETRsegm
from tests.conftest import TINY, with_aids
from tests.unit.test_checkpoint import _official_r50_keys


def _official_mask_head_shapes(d: int = 256, heads: int = 8,
                               fpn: tuple = (1024, 512, 256)) -> dict[str, tuple]:
    """The official DETRsegm's own tensors (models/segmentation.py), written from its
    structure: MHAttentionMap(d, d, heads) and MaskHeadSmallConv(d + heads, fpn, d)."""
    shapes = {f"bbox_attention.{n}_linear.weight": (d, d) for n in "qk"}
    shapes |= {f"bbox_attention.{n}_linear.bias": (d,) for n in "qk"}
    widths = [d + heads, d // 2, d // 4, d // 8, d // 16]
    for i, (c_in, c_out) in enumerate(zip([d + heads, *widths[:-1]], widths, strict=True), 1):
        shapes |= {f"mask_head.lay{i}.weight": (c_out, c_in, 3, 3), f"mask_head.lay{i}.bias":
                   (c_out,), f"mask_head.gn{i}.weight": (c_out,), f"mask_head.gn{i}.bias": (c_out,)}
    shapes |= {"mask_head.out_lay.weight": (1, d // 16, 3, 3), "mask_head.out_lay.bias": (1,)}
    for i, c_in in enumerate(fpn, 1):
        shapes |= {f"mask_head.adapter{i}.weight": (widths[i], c_in, 1, 1),
                   f"mask_head.adapter{i}.bias": (widths[i],)}
    return shapes


@pytest.fixture(scope="module")
def panoptic_r50():
    torch.manual_seed(3)
    return detr.detr_resnet50_panoptic()


def test_detr_resnet50_panoptic_has_the_official_keys_and_shapes(panoptic_r50):
    sd = panoptic_r50.state_dict()
    head = _official_mask_head_shapes()
    assert set(sd) == {f"detr.{k}" for k in _official_r50_keys()} | set(head)
    assert {k: tuple(sd[k].shape) for k in head} == head
    box = detr.detr_resnet50(num_classes=250).state_dict()  # its shapes: test_checkpoint
    assert {k: tuple(v.shape) for k, v in box.items()} == {
        k[len("detr."):]: tuple(v.shape) for k, v in sd.items() if k.startswith("detr.")}
    assert sd["detr.class_embed.weight"].shape == (251, 256)


def test_panoptic_pretrained_loads_strictly(panoptic_r50, tmp_path, monkeypatch):
    path = tmp_path / "detr-r50-panoptic-test.pth"
    torch.save({"model": panoptic_r50.state_dict()}, path)
    loaded = detr.detr_resnet50_panoptic(pretrained=path)
    assert loaded.load_report.skipped == {}
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = panoptic_r50.eval()(x), loaded.eval()(x)
    assert torch.equal(a["pred_masks"], b["pred_masks"])
    seen = []
    monkeypatch.setattr("detr.hub.load_state_dict_file",
                        lambda source: seen.append(source) or panoptic_r50.state_dict())
    detr.detr_resnet50_panoptic(pretrained=True)
    assert seen == ["https://dl.fbaipublicfiles.com/detr/detr-r50-panoptic-00ce5173.pth"]


@pytest.mark.parametrize("entry, url", [
    ("detr_resnet50_dc5_panoptic", "detr-r50-dc5-panoptic-da08f1b1.pth"),
    ("detr_resnet101_panoptic", "detr-r101-panoptic-40021d53.pth")])
def test_other_panoptic_entry_points_fetch_their_checkpoint(entry, url, monkeypatch):
    seen = []

    def fake(source):
        seen.append(source)
        return model.state_dict()

    model = getattr(detr, entry)()
    assert isinstance(model, DETRsegm) and model.num_classes == 250
    monkeypatch.setattr("detr.hub.load_state_dict_file", fake)
    assert getattr(detr, entry)(pretrained=True).load_report.skipped == {}
    assert seen == ["https://dl.fbaipublicfiles.com/detr/" + url]


def test_a_box_checkpoint_loads_into_the_segmentation_model_with_a_fresh_mask_head():
    box = build_model(with_aids(TINY, dense={}))  # with a training-only part, too
    segm = build_model(dataclasses.replace(TINY, task="panoptic"))
    head_before = {k: v.clone() for k, v in segm.state_dict().items()
                   if not k.startswith("detr.")}
    report = load_detector_weights(segm, box.state_dict())
    sd = segm.state_dict()
    for k, v in box.state_dict().items():
        if not k.startswith("dense_embed."):
            assert torch.equal(sd[f"detr.{k}"], v), k
    assert all(torch.equal(sd[k], v) for k, v in head_before.items())
    assert set(head_before) <= set(report.skipped)
    assert not set(head_before) & set(report.loaded)
    assert any(k.startswith("detr.dense_embed.") for k in report.skipped)


def test_a_box_checkpoint_of_other_classes_loads_for_finetuning():
    box = build_model(dataclasses.replace(TINY, num_classes=3))
    segm = build_model(dataclasses.replace(TINY, task="segmentation"))
    report = load_detector_weights(segm, box.state_dict(), finetune=True)
    assert "detr.class_embed.weight" in report.skipped


def test_model_from_checkpoint_rebuilds_a_segmentation_model(tmp_path):
    cfg = dataclasses.replace(TINY, task="segmentation")
    model = build_model(cfg).eval()
    path = tmp_path / "segm.pth"
    torch.save({"model": model.state_dict(), "params": {"model": to_dict(cfg)}}, path)
    loaded, loaded_cfg, _ = model_from_checkpoint(path)
    assert isinstance(loaded, DETRsegm) and loaded_cfg.task == "segmentation"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["pred_masks"], loaded(x)["pred_masks"])
