import dataclasses
import types

import pytest
import torch

from detr import engine
from detr import train as train_module
from detr.checkpoint import CheckpointError, load_file
from detr.config import ConfigError, TrainConfig, load_section
from detr.ema import EMA
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
    """EMA and validation during training on: the weights, the EMA, the val curve and
    best.pth of an interrupted and resumed run are those of an uninterrupted one."""
    train = {"epochs": 3, "ema_decay": 0.9, "eval_every_steps": 3}
    full = _fit(tiny_dataset, tmp_path / "full", train=train)
    assert full.epochs == 3 and full.evaluation is not None
    part = _fit(tiny_dataset, tmp_path / "split", train=train, stop_after_epoch=0)
    assert part.evaluation is None and load_file(part.checkpoint)["epoch"] == 0
    resumed = _fit(tiny_dataset, tmp_path / "split", train=train)
    a, b = load_file(full.checkpoint), load_file(resumed.checkpoint)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), f"resumed {key} diverged"
    assert len(resumed.history) == 3  # the history travels in the checkpoint
    assert resumed.val_curve == full.val_curve and [r["step"] for r in full.val_curve] == [3, 6]
    best_a, best_b = load_file(full.best), load_file(resumed.best)
    assert best_a["step"] == best_b["step"]
    assert all(torch.equal(best_a["model"][k], best_b["model"][k]) for k in best_a["model"])


def test_validation_during_training_leaves_the_training_unchanged(tiny_dataset, tmp_path):
    """Evaluations mid-epoch leave the training's random streams as they were (evaluating
    draws from them) and the model in train mode (batch-norm statistics would differ):
    without either restore in detr.train._evaluate_aside this test fails."""
    plain = _fit(tiny_dataset, tmp_path / "plain", evaluate_at_end=False)
    watched = _fit(tiny_dataset, tmp_path / "watched", evaluate_at_end=False,
                   train={"eval_every_steps": 1})
    assert len(watched.val_curve) == 4
    a, b = _weights(plain.checkpoint), _weights(watched.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a), "evaluating changed the training"


def test_checkpoint_contents(tiny_dataset, tmp_path):
    result = _fit(tiny_dataset, tmp_path, train={"epochs": 1})
    ckpt = load_file(result.checkpoint)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "rng", "params", "label_map",
            "monitor"} <= set(ckpt)
    best = load_file(result.best)  # no evaluation during training: best.pth = the last weights
    assert best["val"] is None and all(torch.equal(best["model"][k], v)
                                       for k, v in ckpt["model"].items())
    assert [c["name"] for c in ckpt["label_map"]["categories"]][:2] == ["circle", "square"]
    assert ckpt["params"]["model"]["num_classes"] == 6  # taken from the dataset
    assert ckpt["model"]["class_embed.weight"].shape[0] == 7


def test_other_params_start_afresh_and_keep_the_old_checkpoint(tiny_dataset, tmp_path):
    _fit(tiny_dataset, tmp_path, train={"epochs": 1})
    old, old_best = ((tmp_path / name).read_bytes() for name in ("checkpoint.pth", "best.pth"))
    _fit(tiny_dataset, tmp_path, train={"epochs": 1, "lr": 5e-4})
    assert (tmp_path / "checkpoint.stale.pth").read_bytes() == old
    assert (tmp_path / "best.stale.pth").read_bytes() == old_best


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


def _fake_val_ap(monkeypatch, aps):
    """Evaluations during training report ``aps`` in turn; returns the weights each saw."""
    seen = []

    def fake(model, *args, **kwargs):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return types.SimpleNamespace(stats={"AP": aps[len(seen) - 1], "AP50": 0.0})

    monkeypatch.setattr(train_module, "_evaluate", fake)
    return seen


def test_best_checkpoint_keeps_the_weights_with_the_highest_val_ap(
        tiny_dataset, tmp_path, monkeypatch):
    seen = _fake_val_ap(monkeypatch, [0.1, 0.3, 0.2, 0.25])
    logged = []
    result = _fit(tiny_dataset, tmp_path, train={"epochs": 2, "eval_every_steps": 1},
                  evaluate_at_end=False, callback=logged.append)
    assert [(r["step"], r["AP"]) for r in result.val_curve] == [
        (1, 0.1), (2, 0.3), (3, 0.2), (4, 0.25)]
    best = load_file(result.best)
    assert (best["step"], best["val"]["AP"]) == (2, 0.3)
    assert all(torch.equal(best["model"][k], v) for k, v in seen[1].items())
    assert [r["val_AP"] for r in logged if "val_AP" in r and "step" in r] == [0.1, 0.3, 0.2, 0.25]
    assert [r.get("val_AP") for r in result.history] == [0.3, 0.25]  # the epoch's latest


def test_early_stop_after_patience_evaluations_without_a_better_ap(
        tiny_dataset, tmp_path, monkeypatch):
    _fake_val_ap(monkeypatch, [0.5, 0.4, 0.3, 0.2, 0.6, 0.7])
    train = {"epochs": 4, "eval_every_steps": 1, "early_stop_patience": 2}
    result = _fit(tiny_dataset, tmp_path, train=train, evaluate_at_end=False)
    assert result.stopped_early and result.epochs == 2  # patience ran out in epoch 1
    assert load_file(result.best)["step"] == 1
    again = _fit(tiny_dataset, tmp_path, train=train, evaluate_at_end=False)
    assert again.stopped_early and again.epochs == 2 and load_file(again.checkpoint)["epoch"] == 1


def test_losses_are_logged_every_log_every_steps_as_window_means(
        tiny_dataset, tmp_path, monkeypatch):
    batches = []
    original = engine._forward_backward

    def recording(*args):
        names, values = original(*args)
        batches.append(dict(zip(names, values.tolist(), strict=True)))
        return names, values

    monkeypatch.setattr(engine, "_forward_backward", recording)
    logged = []
    _fit(tiny_dataset, tmp_path, train={"epochs": 1, "batch_size": 1, "log_every": 3},
         evaluate_at_end=False, callback=logged.append)
    steps = [r for r in logged if "step" in r]
    assert [r["step"] for r in steps] == [3, 6, 8]  # the epoch's rest at its end
    for row, window in zip(steps, (batches[0:3], batches[3:6], batches[6:8]), strict=True):
        for name in ("loss", "loss_giou"):
            assert row[name] == pytest.approx(sum(b[name] for b in window) / len(window))
    epoch = [r for r in logged if "step" not in r]
    assert epoch[0]["epoch_loss"] == pytest.approx(sum(b["loss"] for b in batches) / 8)


def test_a_checkpoint_past_train_epochs_is_refused(tiny_dataset, tmp_path):
    _fit(tiny_dataset, tmp_path, train={"epochs": 2, "batch_size": 8}, evaluate_at_end=False)
    with pytest.raises(CheckpointError, match=r"trained 2 epochs.*train.epochs is 1.*"
                                              r"dvc checkout --force.*delete"):
        _fit(tiny_dataset, tmp_path, train={"epochs": 1, "batch_size": 8})


def test_ema_is_the_exponential_average_of_the_weights():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.9 * 1.0 + 0.1 * 3.0))
    assert not ema.module.training and int(ema.state_dict()["n_averaged"]) == 2


@pytest.mark.parametrize(("keys", "message"), [
    ({"ema_decay": 1.0}, r"train.ema_decay: 1.0 must be in \[0, 1\)"),
    ({"log_every": 0}, r"train.log_every: 0 must be >= 1"),
    ({"early_stop_patience": 3}, r"train.early_stop_patience: 3 needs train.eval_every_steps"),
])
def test_training_monitor_params_are_checked(keys, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**keys)


def test_the_old_eval_every_key_names_its_successor():
    with pytest.raises(ConfigError, match=r"train.eval_every: .*train.eval_every_steps"):
        load_section(TrainConfig, {"eval_every": 1}, "train")
