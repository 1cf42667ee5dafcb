"""Train a DETR on a canonical COCO dataset: ``fit()`` and ``python -m detr.train``.

    python -m detr.train --params params.yaml --data data/demo --out checkpoints/
    torchrun --nproc-per-node 4 -m detr.train --params params.yaml --data ... --out ...

``out/checkpoint.pth`` is written atomically after every epoch (model, optimizer,
lr_scheduler, ema, monitor, epoch, rng, params, label_map); a run finds it and resumes exactly
where it stopped. A checkpoint made with other params is moved aside to
``checkpoint.stale.pth``, never overwritten in place; one past ``train.epochs`` is refused.
``out/best.pth`` holds the weights with the best val AP of the evaluations during training
(``train.eval_every_steps``), the last ones if none ran: resume reads checkpoint.pth, the
evaluate and register stages read best.pth.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from detr import distributed, hub
from detr.checkpoint import (
    CheckpointError,
    load_file,
    load_state_dict_file,
    save_file,
)
from detr.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    load_params,
    migrate_params,
    to_dict,
)
from detr.data.batching import collate
from detr.data.coco import AnnotationError, CocoDetection
from detr.data.transforms import make_transforms
from detr.device import resolve_precision
from detr.ema import EMA
from detr.engine import Callback, evaluate, train_one_epoch
from detr.evaluation import CocoEvaluation, evaluate_detections
from detr.models.criterion import build_criterion
from detr.models.detr import DETR
from detr.models.postprocess import PostProcess
from detr.monitor import ValMonitor
from detr.optim import build_optimizer, build_scheduler
from detr.settings import needs_resolving, resolve_configs

CHECKPOINT = "checkpoint.pth"
BEST = "best.pth"


@dataclass
class FitResult:
    checkpoint: Path  # the last epoch's, to resume from
    epochs: int  # epochs trained in all (fewer than train.epochs after an early stop)
    evaluation: CocoEvaluation | None
    history: list[dict]
    start_epoch: int = 0  # > 0: resumed from the checkpoint of epoch start_epoch - 1
    best: Path | None = None  # best.pth: the best weights by val AP (the last if none ran)
    val_curve: list[dict] = field(default_factory=list)  # ValMonitor.curve
    stopped_early: bool = False


def fit(*, model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig,
        train_cfg: TrainConfig, data_root: str | Path, out_dir: str | Path,
        init_weights: str | Path | None = None, callback: Callback | None = None,
        progress: bool = True, stop_after_epoch: int | None = None,
        evaluate_at_end: bool = True) -> FitResult:
    """Train (or resume) and evaluate on val.

    ``model_cfg.num_classes`` is replaced by the dataset's number of categories; ``auto``
    values are resolved from the dataset first (:mod:`detr.settings`, the table printed).
    ``init_weights``: a checkpoint to fine-tune from (class head re-initialised if it differs);
    defaults to ``train_cfg.init_weights``.
    ``stop_after_epoch``: stop (as if interrupted) after that epoch, for tests and budgets.
    ``evaluate_at_end``: COCO evaluation of the final weights (the EMA's when on) on all of val
    after the last epoch (the pipeline's evaluate stage does its own, of best.pth, so it turns
    this off).
    Every ``train_cfg.eval_every_steps`` steps, and after the last one, the val AP of the
    weights (the EMA's with ``train_cfg.ema_decay``) on the first ``eval_images`` val images;
    the best go to ``out_dir/best.pth`` (``model``, ``params``, ``label_map``, ``epoch``,
    ``step``, ``val``: the statistics); without evaluations best.pth holds the final weights.
    Evaluating neither draws from the training's random streams nor leaves eval mode behind:
    the trained weights are the same with and without it.
    ``callback`` gets the logged losses (:func:`detr.engine.train_one_epoch`), each
    evaluation as ``{"step", "epoch", "val_AP", ...}`` and each epoch as ``{"epoch",
    "epoch_loss", ..., "val_AP"?}`` (the epoch's latest evaluation).

    Raises:
        CheckpointError: ``out_dir/checkpoint.pth`` is past ``train_cfg.epochs``.
    """
    train_cfg = with_init_weights(train_cfg, init_weights)
    info = distributed.init(train_cfg.device)
    precision = resolve_precision(train_cfg.precision, info.device)
    if needs_resolving({"model": to_dict(model_cfg), "data": to_dict(data_cfg),
                        "train": to_dict(train_cfg)}):
        model_cfg, data_cfg, train_cfg, resolution = resolve_configs(
            model_cfg, data_cfg, train_cfg, data_root, device=info.device.type,
            world_size=info.world_size)
        if info.is_main:
            print(resolution.table(), file=sys.stderr)
    train_ds, val_ds = _datasets(Path(data_root), data_cfg,
                                 masks=model_cfg.task != "detection")
    model_cfg = dataclasses.replace(model_cfg, num_classes=train_ds.num_classes)
    params = {"model": to_dict(model_cfg), "loss": to_dict(loss_cfg), "data": to_dict(data_cfg),
              "train": to_dict(train_cfg)}
    _seed(train_cfg.seed + info.rank)
    model = hub.build(model_cfg).to(info.device)
    if train_cfg.init_weights is not None:
        _load_init_weights(model, train_cfg.init_weights)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion(model_cfg.num_classes, loss_cfg, model.aids).to(info.device)
    optimizer = build_optimizer(model, train_cfg)
    train_loader, sampler = _loader(train_ds, data_cfg, train_cfg, info, shuffle=True)
    steps_per_epoch = -(-len(train_loader) // train_cfg.grad_accum)
    scheduler = build_scheduler(optimizer, train_cfg, steps_per_epoch)
    ema = EMA(model, train_cfg.ema_decay) if train_cfg.ema_decay else None
    monitor = ValMonitor(patience=train_cfg.early_stop_patience)
    state = {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler, "ema": ema,
             "monitor": monitor}
    out_dir = Path(out_dir)
    start_epoch, history = _resume(out_dir, params, train_cfg.epochs, state, info)
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=None)
           if info.distributed else model)
    postprocess = PostProcess(train_ds.label_to_category).to(info.device)
    val_loader, _ = _loader(val_ds, data_cfg, train_cfg, info, shuffle=False)
    check_loader, check_ids = _val_subset(val_ds, data_cfg, train_cfg, info)
    final = ema.module if ema else model  # what is evaluated and kept as best.pth

    def validate(step: int, epoch: int) -> None:
        ev = _evaluate_aside(final, postprocess, check_loader, val_ds, info, precision,
                             train_cfg, check_ids)
        if monitor.record(step, epoch, ev.stats) and info.is_main:
            _save_best(out_dir / BEST, final, step, epoch, ev.stats, params, train_ds)
        if callback and info.is_main:
            callback({"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in ev.stats.items()}})

    def on_step(step: int, epoch: int) -> None:
        if ema:
            ema.update(model)
        if train_cfg.eval_every_steps and step % train_cfg.eval_every_steps == 0:
            validate(step, epoch)

    step = start_epoch * steps_per_epoch
    last = train_cfg.epochs if stop_after_epoch is None else min(stop_after_epoch + 1,
                                                                 train_cfg.epochs)
    done = start_epoch
    for epoch in range(start_epoch, last):
        if monitor.should_stop:
            break
        sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(train_cfg.seed * 1000 + epoch)
        means, step = train_one_epoch(
            ddp, criterion, train_loader, optimizer, device=info.device, epoch=epoch, step=step,
            scheduler=scheduler, precision=precision, clip_max_norm=train_cfg.clip_max_norm,
            grad_accum=train_cfg.grad_accum, channels_last=train_cfg.channels_last,
            callback=callback if info.is_main else None, log_every=train_cfg.log_every,
            on_step=lambda s, e=epoch: on_step(s, e), progress=progress and info.is_main)
        done = epoch + 1
        if done == train_cfg.epochs and train_cfg.eval_every_steps and monitor.last_step != step:
            validate(step, epoch)  # the final weights compete for best.pth too
        record = {"epoch": epoch, **{f"epoch_{k}": v for k, v in means.items()}}
        if monitor.curve and monitor.curve[-1]["epoch"] == epoch:
            record.update({f"val_{k}": v for k, v in monitor.curve[-1].items()
                           if k not in ("step", "epoch")})
        history.append(record)
        if info.is_main:
            _save(out_dir, state, epoch, params, train_ds, history)
            if callback:
                callback(record)
        distributed.barrier(info)
    finished = done == train_cfg.epochs or monitor.should_stop
    if finished and info.is_main and not (out_dir / BEST).is_file():
        _save_best(out_dir / BEST, final, step, done - 1, None, params, train_ds)
    if monitor.should_stop and info.is_main:
        print(f"early stop after epoch {done - 1}: val AP {monitor.best_ap:.4f} at step "
              f"{monitor.best_step}, not beaten in {monitor.bad_evals} evaluations "
              f"(train.early_stop_patience)", file=sys.stderr)
    evaluation = None
    if finished and evaluate_at_end:
        evaluation = _evaluate(final, postprocess, val_loader, val_ds, info, precision,
                               train_cfg, progress)
    distributed.shutdown(info)
    return FitResult(out_dir / CHECKPOINT, done, evaluation, history, start_epoch,
                     out_dir / BEST if finished else None, list(monitor.curve),
                     monitor.should_stop)


def with_init_weights(train_cfg: TrainConfig, init_weights: str | Path | None) -> TrainConfig:
    """``train_cfg`` with ``init_weights`` (a checkpoint given beside the params, e.g.
    ``--init-weights``) as its ``train.init_weights``, so that the settings rules (a pretrained
    start: ``train.lr_backbone``) and the logged params see it; None leaves it as it is."""
    if init_weights is None:
        return train_cfg
    return dataclasses.replace(train_cfg, init_weights=str(init_weights))


def _load_init_weights(model: DETR, init_weights: str | Path) -> None:
    try:
        # a box checkpoint seeds a segmentation model too (the mask head starts fresh)
        report = hub.load_detector_weights(model, load_state_dict_file(init_weights),
                                           finetune=True)
    except CheckpointError as exc:  # name the file (load_weights does not know it)
        if str(init_weights) in str(exc):
            raise
        raise CheckpointError(f"{init_weights}: {exc}") from None
    print(report, file=sys.stderr)


def _datasets(root: Path, cfg: DataConfig, *,
              masks: bool = False) -> tuple[CocoDetection, CocoDetection]:
    """Train (with ``masks`` for a segmentation model's loss) and val (boxes: the mask
    evaluation reads the json's own masks) splits."""
    kw = {"scales": cfg.scales, "max_size": cfg.max_size, "crop_scales": cfg.crop_scales,
          "crop_size": tuple(cfg.crop_size), "hflip": cfg.hflip}
    train = CocoDetection.from_root(root, "train", transforms=make_transforms("train", **kw),
                                    masks=masks)
    val = CocoDetection.from_root(root, "val", transforms=make_transforms("val", **kw))
    if train.label_to_category != val.label_to_category:
        raise ValueError(f"{root}: train and val annotation files list different categories")
    for ds, use in ((train, "train"), (val, "evaluate")):
        if len(ds) == 0:  # else an "empty" training would save an untrained model
            raise AnnotationError(f"{ds.ann_file}: no images in this split: nothing to {use} on")
    return train, val


def _loader(ds, data_cfg: DataConfig, train_cfg: TrainConfig, info, *, shuffle: bool):
    sampler = DistributedSampler(ds, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=shuffle, seed=train_cfg.seed, drop_last=False)
    loader = DataLoader(ds, batch_size=train_cfg.batch_size, sampler=sampler,
                        collate_fn=collate, num_workers=data_cfg.num_workers,
                        generator=torch.Generator().manual_seed(train_cfg.seed),
                        pin_memory=info.device.type == "cuda", drop_last=False)
    return loader, sampler


def _evaluate(model: DETR, postprocess, loader, ds, info, precision, cfg, progress,
              image_ids=None):
    local = evaluate(model, postprocess, loader, device=info.device, precision=precision,
                     channels_last=cfg.channels_last, progress=progress and info.is_main)
    return evaluate_detections(ds.coco, distributed.gather_dicts(info, local),
                               image_ids=image_ids)


def _val_subset(ds: CocoDetection, data_cfg: DataConfig, cfg: TrainConfig, info):
    """The loader and image ids of the first ``cfg.eval_images`` val images (all for 0): the
    same images at every evaluation during training, so that the AP curve compares."""
    if not cfg.eval_images or cfg.eval_images >= len(ds):
        return _loader(ds, data_cfg, cfg, info, shuffle=False)[0], None
    subset = Subset(ds, range(cfg.eval_images))
    return _loader(subset, data_cfg, cfg, info, shuffle=False)[0], ds.ids[:cfg.eval_images]


def _evaluate_aside(model: DETR, postprocess, loader, ds, info, precision, cfg, image_ids):
    """:func:`_evaluate` (quietly) that leaves the training as it was: every random stream
    restored, the model back in train mode if it was."""
    rng, training = _rng_state(), model.training
    try:
        return _evaluate(model, postprocess, loader, ds, info, precision, cfg, False, image_ids)
    finally:
        _set_rng_state(rng)
        model.train(training)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), pos, has_gauss, gauss],
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(out_dir: Path, state: dict, epoch: int, params: dict, train_ds, history) -> None:
    """``checkpoint.pth``: the state_dict of each object of ``state`` (model, optimizer,
    lr_scheduler, ema when on, monitor), epoch, rng, params, label_map, history."""
    save_file({**{k: v.state_dict() for k, v in state.items() if v is not None},
               "epoch": epoch, "rng": _rng_state(), "params": params,
               "label_map": train_ds.label_map(), "history": history}, out_dir / CHECKPOINT)


def _save_best(path: Path, model: DETR, step: int, epoch: int, stats: dict | None,
               params: dict, train_ds) -> None:
    """``best.pth``: weights, params and label map (what evaluate, register and predict read),
    and where they come from: ``epoch``, ``step``, ``val`` (None: not evaluated)."""
    save_file({"model": model.state_dict(), "params": params, "label_map": train_ds.label_map(),
               "epoch": epoch, "step": step, "val": stats}, path)


def _resume(out_dir: Path, params: dict, epochs: int, state: dict, info) -> tuple[int, list]:
    """Load ``out_dir/checkpoint.pth`` into ``state``'s objects if it was made with the same
    params (epochs and monitoring aside). Else a fresh start: a checkpoint of other params
    and its best.pth are moved aside (``*.stale.pth``), a best.pth alone is removed.

    Raises:
        CheckpointError: the checkpoint is past ``epochs`` (made by a longer run).
    """
    path = out_dir / CHECKPOINT
    if path.is_file():
        ckpt = load_file(path)
        if _comparable(migrate_params(ckpt.get("params", {}))) == _comparable(params):
            _refuse_longer_run(path, ckpt["epoch"], epochs)
            for key, obj in state.items():
                if obj is not None and key in ckpt:
                    obj.load_state_dict(ckpt[key])
            _set_rng_state(ckpt["rng"])
            print(f"{path}: resuming after epoch {ckpt['epoch']}", file=sys.stderr)
            return ckpt["epoch"] + 1, list(ckpt.get("history", []))
        if info.is_main:
            path.replace(out_dir / "checkpoint.stale.pth")
            if (out_dir / BEST).is_file():
                (out_dir / BEST).replace(out_dir / "best.stale.pth")
            print(f"{path}: made with other params; moved to checkpoint.stale.pth (and "
                  f"best.pth to best.stale.pth), starting afresh", file=sys.stderr)
    if info.is_main:  # a best.pth without its checkpoint.pth belongs to no run
        (out_dir / BEST).unlink(missing_ok=True)
    distributed.barrier(info)
    return 0, []


def _refuse_longer_run(path: Path, epoch: int, epochs: int) -> None:
    if epoch + 1 > epochs:
        raise CheckpointError(
            f"{path}: trained {epoch + 1} epochs (after epoch {epoch}) but train.epochs is "
            f"{epochs}: it belongs to a longer run, and resuming would pass it off as this "
            f"one. Restore the outputs of these params with `dvc checkout --force`, or "
            f"delete {path.parent}/ to train afresh")


# Keys that change what is watched or logged, not the training: a resume may change them.
_MONITORING = ("epochs", "steps", "eval_every", "eval_every_steps", "eval_images", "early_stop_patience",
               "log_every")


def _comparable(params: dict) -> dict:
    """Params that must match to resume: all but the number of epochs, the monitoring and
    the data workers. A checkpoint from before ``train.ema_decay`` had none (0)."""
    out = {k: dict(v) for k, v in params.items()}
    for key in _MONITORING:
        out.get("train", {}).pop(key, None)
    out.get("train", {}).setdefault("ema_decay", 0.0)
    out.get("data", {}).pop("num_workers", None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train DETR on a canonical COCO dataset.")
    parser.add_argument("--params", type=Path, required=True, help="params.yaml")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (annotations/)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--init-weights", type=Path, default=None, help="fine-tune from")
    args = parser.parse_args(argv)
    cfg = load_params(args.params)
    result = fit(model_cfg=cfg["model"], loss_cfg=cfg["loss"], data_cfg=cfg["data"],
                 train_cfg=cfg["train"], data_root=args.data, out_dir=args.out,
                 init_weights=args.init_weights)
    if result.evaluation is not None and int(os.environ.get("RANK", "0")) == 0:
        print(result.evaluation.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
