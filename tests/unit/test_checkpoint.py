import dataclasses
import pickle

import pytest
import torch

import detr
from detr.checkpoint import (
    CheckpointError,
    load_file,
    load_state_dict_file,
    load_weights,
    save_file,
)
from detr.config import ModelConfig, load_section, migrate_params, to_dict
from detr.hub import model_from_checkpoint
from detr.models.detr import build_model
from tests.conftest import with_aids

BN = ("weight", "bias", "running_mean", "running_var")  # FrozenBatchNorm2d: no num_batches_tracked


def _official_r50_keys() -> set[str]:
    """The key names of the official detr-r50 checkpoint, written from its structure."""
    keys = {"backbone.0.body.conv1.weight"} | {f"backbone.0.body.bn1.{b}" for b in BN}
    for layer, blocks in zip((1, 2, 3, 4), (3, 4, 6, 3), strict=True):
        for i in range(blocks):
            p = f"backbone.0.body.layer{layer}.{i}."
            for j in (1, 2, 3):
                keys |= {p + f"conv{j}.weight"} | {p + f"bn{j}.{b}" for b in BN}
            if i == 0:
                keys |= {p + "downsample.0.weight"} | {p + f"downsample.1.{b}" for b in BN}
    attn = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    lin = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
    for i in range(6):
        p = f"transformer.encoder.layers.{i}."
        keys |= {p + f"self_attn.{a}" for a in attn} | {p + x for x in lin}
        keys |= {p + f"norm{n}.{w}" for n in (1, 2) for w in ("weight", "bias")}
        p = f"transformer.decoder.layers.{i}."
        keys |= {p + f"{m}.{a}" for m in ("self_attn", "multihead_attn") for a in attn}
        keys |= {p + x for x in lin} | {p + f"norm{n}.{w}" for n in (1, 2, 3)
                                        for w in ("weight", "bias")}
    keys |= {"transformer.decoder.norm.weight", "transformer.decoder.norm.bias",
             "class_embed.weight", "class_embed.bias", "query_embed.weight",
             "input_proj.weight", "input_proj.bias"}
    keys |= {f"bbox_embed.layers.{i}.{w}" for i in range(3) for w in ("weight", "bias")}
    return keys


def test_detr_resnet50_has_exactly_the_official_key_names():
    sd = detr.detr_resnet50(num_classes=91).state_dict()
    assert set(sd) == _official_r50_keys()
    assert sd["class_embed.weight"].shape == (92, 256)
    assert sd["query_embed.weight"].shape == (100, 256)
    assert sd["input_proj.weight"].shape == (256, 2048, 1, 1)
    assert sd["transformer.encoder.layers.0.linear1.weight"].shape == (2048, 256)


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    """An 'official-format' checkpoint made by the test: {'model': state_dict}."""
    torch.manual_seed(3)
    model = detr.detr_resnet50()
    path = tmp_path_factory.mktemp("ckpt") / "detr-r50-test.pth"
    torch.save({"model": model.state_dict()}, path)
    return path, model


def test_pretrained_path_loads_strictly_and_reproduces_outputs(r50_file):
    path, original = r50_file
    loaded = detr.detr_resnet50(pretrained=path)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = original.eval()(x), loaded.eval()(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"])
    assert loaded.load_report.skipped == {}


def test_pretrained_true_downloads_the_official_checkpoint_with_hash_check(monkeypatch, r50_file):
    calls = {}

    def fake(url, **kwargs):
        calls.update(url=url, **kwargs)
        return torch.load(r50_file[0], weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    detr.detr_resnet50(pretrained=True)
    assert calls["url"] == "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth"
    assert calls["check_hash"] is True and calls["weights_only"] is True


def test_finetune_loader_reinitialises_only_the_class_head(r50_file):
    path, original = r50_file
    model = detr.detr_resnet50(pretrained=path, num_classes=4)
    assert set(model.load_report.skipped) == {"class_embed.weight", "class_embed.bias"}
    assert model.class_embed.weight.shape == (5, 256)
    assert torch.equal(model.bbox_embed.layers[2].bias, original.bbox_embed.layers[2].bias)
    assert "skipped class_embed.weight" in str(model.load_report)


def test_checkpoint_from_another_architecture_is_refused(tmp_path, tiny_cfg):
    path = tmp_path / "other.pth"
    torch.save({"model": build_model(tiny_cfg).state_dict()}, path)
    with pytest.raises(CheckpointError, match="another architecture"):
        detr.detr_resnet50(pretrained=path)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_weights(detr.detr_resnet50(), load_state_dict_file(path), finetune=True)


def test_training_only_parts_may_be_absent_on_either_side(tiny_cfg):
    """An official-style checkpoint (no training-only parts) fine-tunes a model with query
    groups, denoising and the dense head; such a model's checkpoint loads into a plain one."""
    extras = dict(query_groups=3, denoising={"groups": 2}, dense={})
    plain = build_model(dataclasses.replace(tiny_cfg, num_classes=4))
    rich = build_model(with_aids(dataclasses.replace(tiny_cfg, num_classes=6), **extras))
    before = {k: v.clone() for k, v in rich.state_dict().items()}
    report = load_weights(rich, plain.state_dict(), finetune=True)
    fresh = {k for k in before if k.startswith(("group_query_embed.", "denoiser.", "dense_embed."))}
    assert fresh and fresh | {"class_embed.weight", "class_embed.bias"} == set(report.skipped)
    for key in fresh:  # kept their initialisation
        assert torch.equal(rich.state_dict()[key], before[key])
    assert torch.equal(rich.query_embed.weight, plain.query_embed.weight)

    # Same classes, other number of groups: the extra queries start fresh, the rest loads.
    other = build_model(with_aids(dataclasses.replace(tiny_cfg, num_classes=6),
                                  **{**extras, "query_groups": 2}))
    report = load_weights(other, rich.state_dict(), finetune=True)
    assert set(report.skipped) == {"group_query_embed.weight"}

    # The trained model's checkpoint into a plain model: training-only parts are dropped.
    target = build_model(dataclasses.replace(tiny_cfg, num_classes=6))
    report = load_weights(target, rich.state_dict())
    assert set(report.skipped) == fresh
    assert "not in model" in str(report)
    assert torch.equal(target.class_embed.weight, rich.class_embed.weight)

    # Without finetune a different class count is still refused.
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_weights(build_model(with_aids(dataclasses.replace(tiny_cfg, num_classes=4),
                                               **extras)),
                     rich.state_dict())


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_payloads_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_file(path)
    assert "must never run" not in capsys.readouterr().out


def test_files_that_are_not_state_dicts(tmp_path):
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_state_dict_file(tmp_path / "list.pth")
    torch.save({"model": {"a": 1}}, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match="'a' is not a tensor"):
        load_state_dict_file(tmp_path / "ints.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_file(tmp_path / "garbage.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_file(tmp_path / "missing.pth")


def test_atomic_save_round_trip_and_failure_keeps_the_old_file(tmp_path, tiny_cfg, monkeypatch):
    model = build_model(tiny_cfg)
    path = tmp_path / "sub" / "checkpoint.pth"
    save_file({"model": model.state_dict(), "epoch": 3}, path)
    restored = build_model(tiny_cfg)
    load_weights(restored, load_state_dict_file(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 restored.state_dict().values(), strict=True))
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_file({"model": {}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pth"]


def test_backbone_weights_from_a_file(tmp_path):
    import torchvision

    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "r18.pth")
    from detr.hub import build
    from detr.models.backbone import Backbone

    bb = Backbone("resnet18", norm="bn", weights=resnet.state_dict())
    assert torch.equal(bb.body.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    cfg = ModelConfig(backbone="resnet18", norm="bn", last_stage="layer3", hidden_dim=32,
                      nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=32,
                      backbone_weights=str(tmp_path / "r18.pth"))
    body = build(cfg).backbone[0].body  # the file read by detr.hub.build
    assert torch.equal(body.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth: not a ResNet backbone"):
        build(dataclasses.replace(cfg, backbone_weights=str(tmp_path / "bad.pth")))


def test_unknown_override_is_a_clear_error():
    from detr.config import ConfigError

    with pytest.raises(ConfigError, match="hidden_dimm"):
        detr.detr_resnet50(hidden_dimm=3)


def _old_format_params(cfg: ModelConfig) -> dict:
    """The params as checkpoints stored them before ``model.aids``: flat aid keys."""
    model = {k: v for k, v in to_dict(cfg).items() if k != "aids"}
    model.update(dense_aux=True, dense_boxes=True, query_groups=2, dn_groups=2,
                 dn_box_noise=0.3, dn_label_noise=0.1, dn_labels=False)
    return {"model": model, "loss": {"eos_coef": 0.1, "dense_loss_coef": 15.0}}


def test_a_checkpoint_with_the_old_flat_aid_params_still_rebuilds(tiny_cfg, tmp_path):
    cfg = with_aids(tiny_cfg, dense={"boxes": True, "loss_coef": 15.0}, query_groups=2,
                    denoising={"groups": 2, "box_noise": 0.3, "label_noise": 0.1,
                               "labels": False})
    trained = build_model(cfg)
    path = tmp_path / "old.pth"
    save_file({"model": trained.state_dict(), "params": _old_format_params(tiny_cfg)}, path)
    model, model_cfg, _ = model_from_checkpoint(path)
    assert model_cfg.aids == cfg.aids
    assert [aid.name for aid in model.aids] == ["query_groups", "denoising", "dense"]
    for key, value in trained.state_dict().items():  # every tensor, the aids' too
        assert torch.equal(model.state_dict()[key], value), key
    # the migration itself: the loss coefficient moves into the dense section
    migrated = migrate_params(_old_format_params(tiny_cfg))
    assert "dense_loss_coef" not in migrated["loss"] and "dn_groups" not in migrated["model"]
    assert load_section(ModelConfig, migrated["model"], "model") == cfg
    # current params come back as they are; off in the old layout is null in the new one
    assert migrate_params({"model": to_dict(cfg)}) == {"model": to_dict(cfg)}
    off = migrate_params({"model": {"query_groups": 1, "dn_groups": 0, "dense_aux": False}})
    assert off["model"]["aids"] == {"dense": None, "query_groups": None, "denoising": None}


def test_resume_accepts_a_checkpoint_with_the_old_flat_aid_params(tiny_cfg):
    from detr.train import _comparable

    cfg = with_aids(tiny_cfg, dense={"boxes": True, "loss_coef": 15.0}, query_groups=2,
                    denoising={"groups": 2, "box_noise": 0.3, "label_noise": 0.1,
                               "labels": False})
    old = _old_format_params(tiny_cfg)
    new = {"model": to_dict(cfg), "loss": {"eos_coef": 0.1}}
    assert _comparable(migrate_params(old)) == _comparable(new)
