"""Train a DETR on a canonical COCO dataset: ``fit()`` and ``python -m detr.train``.

    python -m detr.train --params params.yaml --data data/demo --out checkpoints/
    torchrun --nproc-per-node 4 -m detr.train --params params.yaml --data ... --out ...

``out/checkpoint.pth`` is written atomically after every epoch (model, optimizer,
lr_scheduler, epoch, rng, params, label_map); a run finds it and resumes exactly where it
stopped. A checkpoint made with other params is moved aside to ``checkpoint.stale.pth``, never
overwritten in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from detr import distributed, hub
from detr.checkpoint import (
    CheckpointError,
    load_file,
    load_state_dict_file,
    load_weights,
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
from detr.engine import Callback, evaluate, train_one_epoch
from detr.evaluation import CocoEvaluation, evaluate_detections
from detr.models.criterion import build_criterion
from detr.models.detr import DETR
from detr.models.postprocess import PostProcess
from detr.optim import build_optimizer, build_scheduler

CHECKPOINT = "checkpoint.pth"


@dataclass
class FitResult:
    checkpoint: Path
    epochs: int
    evaluation: CocoEvaluation | None
    history: list[dict]
    start_epoch: int = 0  # > 0: resumed from the checkpoint of epoch start_epoch - 1


def fit(*, model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig,
        train_cfg: TrainConfig, data_root: str | Path, out_dir: str | Path,
        init_weights: str | Path | None = None, callback: Callback | None = None,
        progress: bool = True, stop_after_epoch: int | None = None,
        evaluate_at_end: bool = True) -> FitResult:
    """Train (or resume) and evaluate on val.

    ``model_cfg.num_classes`` is replaced by the dataset's number of categories.
    ``init_weights``: a checkpoint to fine-tune from (class head re-initialised if it differs);
    defaults to ``train_cfg.init_weights``.
    ``stop_after_epoch``: stop (as if interrupted) after that epoch, for tests and budgets.
    ``evaluate_at_end``: COCO evaluation on val after the last epoch (the pipeline's evaluate
    stage does its own, so it turns this off).
    Per-epoch metrics reach ``callback`` as ``{"epoch", "epoch_loss", ..., "val_AP"?}``.
    """
    info = distributed.init(train_cfg.device)
    precision = resolve_precision(train_cfg.precision, info.device)
    train_ds, val_ds = _datasets(Path(data_root), data_cfg)
    model_cfg = dataclasses.replace(model_cfg, num_classes=train_ds.num_classes)
    params = {"model": to_dict(model_cfg), "loss": to_dict(loss_cfg), "data": to_dict(data_cfg),
              "train": to_dict(train_cfg)}
    _seed(train_cfg.seed + info.rank)
    model = hub.build(model_cfg).to(info.device)
    init_weights = init_weights if init_weights is not None else train_cfg.init_weights
    if init_weights is not None:
        try:
            report = load_weights(model, load_state_dict_file(init_weights), finetune=True)
        except CheckpointError as exc:  # name the file (load_weights does not know it)
            if str(init_weights) in str(exc):
                raise
            raise CheckpointError(f"{init_weights}: {exc}") from None
        print(report, file=sys.stderr)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion(model_cfg.num_classes, loss_cfg, model.aids).to(info.device)
    optimizer = build_optimizer(model, train_cfg)
    train_loader, sampler = _loader(train_ds, data_cfg, train_cfg, info, shuffle=True)
    steps_per_epoch = -(-len(train_loader) // train_cfg.grad_accum)
    scheduler = build_scheduler(optimizer, train_cfg, steps_per_epoch)
    out_dir = Path(out_dir)
    start_epoch, history = _resume(out_dir, params, model, optimizer, scheduler, info)
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=None)
           if info.distributed else model)
    postprocess = PostProcess(train_ds.label_to_category).to(info.device)
    val_loader, _ = _loader(val_ds, data_cfg, train_cfg, info, shuffle=False)
    step = start_epoch * steps_per_epoch
    last = train_cfg.epochs if stop_after_epoch is None else min(stop_after_epoch + 1,
                                                                 train_cfg.epochs)
    for epoch in range(start_epoch, last):
        sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(train_cfg.seed * 1000 + epoch)
        means, step = train_one_epoch(
            ddp, criterion, train_loader, optimizer, device=info.device, epoch=epoch, step=step,
            scheduler=scheduler, precision=precision, clip_max_norm=train_cfg.clip_max_norm,
            grad_accum=train_cfg.grad_accum, channels_last=train_cfg.channels_last,
            callback=callback if info.is_main else None, progress=progress and info.is_main)
        record = {"epoch": epoch, **{f"epoch_{k}": v for k, v in means.items()}}
        if train_cfg.eval_every and (epoch + 1) % train_cfg.eval_every == 0 \
                and epoch + 1 < train_cfg.epochs:
            ev = _evaluate(model, postprocess, val_loader, val_ds, info, precision, train_cfg,
                           progress)
            record.update({f"val_{k}": v for k, v in ev.stats.items()})
        history.append(record)
        if info.is_main:
            _save(out_dir, model, optimizer, scheduler, epoch, params, train_ds, history)
            if callback:
                callback(record)
        distributed.barrier(info)
    evaluation = None
    if last == train_cfg.epochs and evaluate_at_end:
        evaluation = _evaluate(model, postprocess, val_loader, val_ds, info, precision,
                               train_cfg, progress)
    distributed.shutdown(info)
    return FitResult(out_dir / CHECKPOINT, last, evaluation, history, start_epoch)


def _datasets(root: Path, cfg: DataConfig) -> tuple[CocoDetection, CocoDetection]:
    kw = {"scales": cfg.scales, "max_size": cfg.max_size, "crop_scales": cfg.crop_scales,
          "crop_size": tuple(cfg.crop_size), "hflip": cfg.hflip}
    train = CocoDetection.from_root(root, "train", transforms=make_transforms("train", **kw))
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


def _evaluate(model: DETR, postprocess, loader, ds, info, precision, cfg, progress):
    local = evaluate(model, postprocess, loader, device=info.device, precision=precision,
                     channels_last=cfg.channels_last, progress=progress and info.is_main)
    return evaluate_detections(ds.coco, distributed.gather_dicts(info, local))


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


def _save(out_dir, model, optimizer, scheduler, epoch, params, train_ds, history) -> None:
    save_file({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "rng": _rng_state(),
               "params": params, "label_map": train_ds.label_map(), "history": history},
              out_dir / CHECKPOINT)


def _resume(out_dir: Path, params: dict, model, optimizer, scheduler, info) -> tuple[int, list]:
    """Load ``out_dir/checkpoint.pth`` if it was made with the same params (epochs aside)."""
    path = out_dir / CHECKPOINT
    if not path.is_file():
        return 0, []
    ckpt = load_file(path)
    if _comparable(migrate_params(ckpt.get("params", {}))) != _comparable(params):
        if info.is_main:
            path.replace(out_dir / "checkpoint.stale.pth")
            print(f"{path}: made with other params; moved to checkpoint.stale.pth, starting "
                  f"afresh", file=sys.stderr)
        distributed.barrier(info)
        return 0, []
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    _set_rng_state(ckpt["rng"])
    print(f"{path}: resuming after epoch {ckpt['epoch']}", file=sys.stderr)
    return ckpt["epoch"] + 1, list(ckpt.get("history", []))


def _comparable(params: dict) -> dict:
    """Params that must match to resume: all but the number of epochs and data workers."""
    out = {k: dict(v) for k, v in params.items()}
    out.get("train", {}).pop("epochs", None)
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
