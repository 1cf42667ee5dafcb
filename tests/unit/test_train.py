import dataclasses

import pytest
import torch

from detr.checkpoint import load_file
from detr.config import TrainConfig
from detr.engine import NonFiniteLossError
from detr.optim import build_optimizer, build_scheduler
from detr.train import fit
from tests.conftest import tiny_training


def _fit(root, out, **kw):
    model, loss, data, train = tiny_training(**kw.pop("train", {}))
    return fit(model_cfg=model, loss_cfg=loss, data_cfg=data, train_cfg=train, data_root=root,
               out_dir=out, progress=False, **kw)


def _weights(path):
    return load_file(path)["model"]


@pytest.mark.slow
def test_resume_after_an_interruption_ends_with_the_same_weights(tiny_dataset, tmp_path):
    full = _fit(tiny_dataset, tmp_path / "full", train={"epochs": 3})
    assert full.epochs == 3 and full.evaluation is not None
    part = _fit(tiny_dataset, tmp_path / "split", train={"epochs": 3}, stop_after_epoch=0)
    assert part.evaluation is None and load_file(part.checkpoint)["epoch"] == 0
    resumed = _fit(tiny_dataset, tmp_path / "split", train={"epochs": 3})
    a, b = _weights(full.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged"
    assert len(resumed.history) == 3  # the history travels in the checkpoint


def test_checkpoint_contents(tiny_dataset, tmp_path):
    result = _fit(tiny_dataset, tmp_path, train={"epochs": 1})
    ckpt = load_file(result.checkpoint)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "rng", "params", "label_map"} <= set(ckpt)
    assert [c["name"] for c in ckpt["label_map"]["categories"]][:2] == ["circle", "square"]
    assert ckpt["params"]["model"]["num_classes"] == 6  # taken from the dataset
    assert ckpt["model"]["class_embed.weight"].shape[0] == 7


def test_other_params_start_afresh_and_keep_the_old_checkpoint(tiny_dataset, tmp_path):
    _fit(tiny_dataset, tmp_path, train={"epochs": 1})
    old = (tmp_path / "checkpoint.pth").read_bytes()
    _fit(tiny_dataset, tmp_path, train={"epochs": 1, "lr": 5e-4})
    assert (tmp_path / "checkpoint.stale.pth").read_bytes() == old


def test_nan_loss_stops_with_step_and_term_and_keeps_the_last_good_checkpoint(
        tiny_dataset, tmp_path, monkeypatch):
    _fit(tiny_dataset, tmp_path, train={"epochs": 1})
    good = (tmp_path / "checkpoint.pth").read_bytes()
    from detr.models import criterion as criterion_module

    original = criterion_module.SetCriterion._loss_boxes

    def poisoned(self, *args):
        out = original(self, *args)
        out["loss_giou"] = out["loss_giou"] * float("nan")
        return out

    monkeypatch.setattr(criterion_module.SetCriterion, "_loss_boxes", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2: loss term 'loss"):
        _fit(tiny_dataset, tmp_path, train={"epochs": 2})
    assert (tmp_path / "checkpoint.pth").read_bytes() == good


def test_schedule_warmup_step_and_cosine(tiny_cfg):
    from detr.models.detr import build_model

    model = build_model(tiny_cfg)
    cfg = TrainConfig(epochs=4, lr=1.0, lr_backbone=0.1, warmup_steps=4, lr_drop=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.1)
    assert opt.param_groups[1]["name"] == "backbone"
    cos_cfg = dataclasses.replace(cfg, lr_schedule="cosine", warmup_steps=0)
    cos = build_scheduler(build_optimizer(model, cos_cfg), cos_cfg, steps_per_epoch=5)
    factors = [cos.lr_lambdas[0](s) for s in (0, 10, 20)]
    assert factors == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)


def test_lr_backbone_zero_freezes_the_backbone(tiny_cfg):
    from detr.models.detr import build_model

    model = build_model(tiny_cfg)
    opt = build_optimizer(model, TrainConfig(lr_backbone=0.0))
    assert len(opt.param_groups) == 1
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if n.startswith("backbone."))
