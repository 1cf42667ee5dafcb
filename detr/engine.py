"""Training and evaluation loops: one epoch at a time, no file I/O.

Batches are ``(images [B,3,H,W], mask [B,H,W], targets)`` as :func:`detr.data.batching.collate`
makes them. Metrics go to an optional ``callback(dict)``: per optimiser step ``{"step",
"epoch", "loss", <each loss term>, "lr", "lr_backbone"}``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from detr.device import autocast
from detr.distributed import mean_over_processes
from detr.models.criterion import SetCriterion
from detr.models.postprocess import PostProcess

Callback = Callable[[dict], None]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the step and the term."""


def to_device(batch: tuple, device: torch.device, channels_last: bool = False) -> tuple:
    images, mask, targets = batch
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                for k, v in t.items()} for t in targets]
    return images, mask.to(device, non_blocking=True), targets


def train_one_epoch(model: nn.Module, criterion: SetCriterion, loader: Iterable,
                    optimizer: torch.optim.Optimizer, *, device: torch.device, epoch: int,
                    step: int = 0, scheduler=None, precision: str = "fp32",
                    clip_max_norm: float = 0.1, grad_accum: int = 1,
                    channels_last: bool = False, callback: Callback | None = None,
                    progress: bool = True) -> tuple[dict[str, float], int]:
    """Train for one pass over ``loader``.

    ``step`` counts optimiser steps across epochs; one step per ``grad_accum`` batches.
    Returns the epoch's mean of every logged value and the new step count.

    Raises:
        NonFiniteLossError: a loss term is NaN/inf (before any weight is updated with it).
    """
    model.train()
    sums: dict[str, float] = {}
    batches = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, dynamic_ncols=True)
    num_batches = len(loader) if hasattr(loader, "__len__") else None
    for i, batch in enumerate(bar):
        images, mask, targets = to_device(batch, device, channels_last)
        update = (i + 1) % grad_accum == 0 or (num_batches is not None and i + 1 == num_batches)
        no_sync = getattr(model, "no_sync", None)
        with no_sync() if (no_sync and not update) else contextlib.nullcontext():
            values, total = _forward_backward(model, criterion, images, mask, targets,
                                              device, precision, grad_accum, epoch, step)
        if update:
            _optimizer_step(model, optimizer, scheduler, clip_max_norm)
            step += 1
            values.update(_learning_rates(optimizer), step=step, epoch=epoch)
            if callback:
                callback(values)
        batches += 1
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{sums['loss'] / batches:.3f}",
                        giou=f"{sums['loss_giou'] / batches:.3f}")
    means = {k: v / max(batches, 1) for k, v in sums.items() if k not in ("step", "epoch")}
    return means, step


def _forward_backward(model, criterion, images, mask, targets, device, precision, grad_accum,
                      epoch, step) -> tuple[dict[str, float], Tensor]:
    try:
        with autocast(device, precision):
            outputs = model(images, mask, targets)  # targets feed denoising queries, if any
        losses = criterion(outputs, targets)
    except FloatingPointError as exc:
        raise NonFiniteLossError(f"epoch {epoch}, step {step}: {exc}") from exc
    total = criterion.total(losses)
    values = _global_values({**losses, "loss": total})
    for name in ["loss", *losses]:
        if not math.isfinite(values[name]):
            raise NonFiniteLossError(
                f"epoch {epoch}, step {step}: loss term {name!r} is {values[name]} "
                f"(lower train.lr, check the data, or keep train.clip_max_norm > 0)")
    (total / grad_accum).backward()
    return values, total


def _global_values(losses: dict[str, Tensor]) -> dict[str, float]:
    """Loss values as plain floats, averaged over DDP processes (each holds part of the
    batch), so that the logged loss is the global batch's."""
    stacked = mean_over_processes(torch.stack([v.detach().float() for v in losses.values()]))
    return dict(zip(losses, stacked.tolist(), strict=True))


def _optimizer_step(model: nn.Module, optimizer, scheduler, clip_max_norm: float) -> None:
    if clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()


def _learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {f"lr{'' if g.get('name', 'main') == 'main' else '_' + g['name']}": g["lr"]
            for g in optimizer.param_groups}


@torch.inference_mode()
def evaluate(model: nn.Module, postprocess: PostProcess, loader: Iterable, *,
             device: torch.device, precision: str = "fp32", channels_last: bool = False,
             progress: bool = True) -> dict[int, dict[str, Tensor]]:
    """Detections for every image of ``loader``, keyed by ``image_id``: ``boxes`` absolute
    xyxy in the original image's pixels (``orig_size``), ``scores``, ``labels`` (category ids
    if ``postprocess`` has a mapping); on the CPU."""
    model.eval()
    predictions = {}
    for batch in tqdm(loader, desc="evaluate", disable=not progress, dynamic_ncols=True):
        images, mask, targets = to_device(batch, device, channels_last)
        with autocast(device, precision):
            outputs = model(images, mask)
        sizes = torch.stack([t["orig_size"] for t in targets])
        for target, det in zip(targets, postprocess(outputs, sizes), strict=True):
            predictions[int(target["image_id"])] = {k: v.cpu() for k, v in det.items()}
    return predictions
