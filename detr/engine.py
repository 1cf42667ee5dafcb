"""Training and evaluation loops: one epoch at a time, no file I/O.

Batches are ``(images [B,3,H,W], mask [B,H,W], targets)`` as :func:`detr.data.batching.collate`
makes them. Metrics go to an optional ``callback(dict)``: every ``log_every`` optimiser steps ``{"step",
"epoch", "loss", <each loss term>, "lr", "lr_backbone"}``, the loss terms averaged over the
batches since the last call (summed on the device: no host sync per value per step).
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
from detr.masks_out import MaskOutputs, segment_batch
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
                    log_every: int = 1, on_step: Callable[[int], None] | None = None,
                    progress: bool = True) -> tuple[dict[str, float], int]:
    """Train for one pass over ``loader``.

    ``step`` counts optimiser steps across epochs; one step per ``grad_accum`` batches.
    The loss terms are summed on the device: the host reads them only every ``log_every``
    steps, when ``callback`` gets their mean over the batches since its last call (and once
    more at the end of the epoch for the rest). ``on_step(step)`` runs after every optimiser
    step (an EMA update, a validation).
    Returns the epoch's mean of every loss term and learning rate, and the new step count.

    Raises:
        NonFiniteLossError: a loss term is NaN/inf (before any weight is updated with it).
    """
    model.train()
    total = window = None  # [terms] sums over the epoch's / the log window's batches
    batches = in_window = steps = 0
    lr_sums: dict[str, float] = {}
    lrs: dict[str, float] = {}
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, dynamic_ncols=True)
    num_batches = len(loader) if hasattr(loader, "__len__") else None
    for i, batch in enumerate(bar):
        images, mask, targets = to_device(batch, device, channels_last)
        update = (i + 1) % grad_accum == 0 or (num_batches is not None and i + 1 == num_batches)
        no_sync = getattr(model, "no_sync", None)
        with no_sync() if (no_sync and not update) else contextlib.nullcontext():
            names, values = _forward_backward(model, criterion, images, mask, targets,
                                              device, precision, grad_accum, epoch, step)
        total = values if total is None else total + values
        window = values if window is None else window + values
        batches, in_window = batches + 1, in_window + 1
        if update:
            _optimizer_step(model, optimizer, scheduler, clip_max_norm)
            step, steps = step + 1, steps + 1
            lrs = _learning_rates(optimizer)
            lr_sums = {k: lr_sums.get(k, 0.0) + v for k, v in lrs.items()}
            if on_step:
                on_step(step)
            if step % log_every == 0:
                _log(callback, bar, names, window / in_window, lrs, step, epoch)
                window, in_window = None, 0
    if in_window:  # the epoch's last steps since the last log
        _log(callback, bar, names, window / in_window, lrs, step, epoch)
    means = dict(zip(names, (total / max(batches, 1)).tolist(), strict=True)) if total is not None \
        else {}
    return {**means, **{k: v / max(steps, 1) for k, v in lr_sums.items()}}, step


def _log(callback: Callback | None, bar, names: list[str], means: Tensor, lrs: dict,
         step: int, epoch: int) -> None:
    """One host read of the window's mean loss terms, to ``callback`` and the progress bar."""
    if callback is None and bar.disable:
        return
    values = dict(zip(names, means.tolist(), strict=True))
    bar.set_postfix(loss=f"{values['loss']:.3f}", giou=f"{values.get('loss_giou', 0):.3f}")
    if callback:
        callback({**values, **lrs, "step": step, "epoch": epoch})


def _forward_backward(model, criterion, images, mask, targets, device, precision, grad_accum,
                      epoch, step) -> tuple[list[str], Tensor]:
    """Backward of the total loss; returns the names (``loss`` first) and values of every
    loss term, on the device, averaged over DDP processes (each holds part of the batch)."""
    try:
        with autocast(device, precision):
            outputs = model(images, mask, targets)  # targets feed denoising queries, if any
        losses = criterion(outputs, targets)
    except FloatingPointError as exc:
        raise NonFiniteLossError(f"epoch {epoch}, step {step}: {exc}") from exc
    total = criterion.total(losses)
    names = ["loss", *losses]
    values = mean_over_processes(torch.stack([total.detach().float(),
                                              *(v.detach().float() for v in losses.values())]))
    if not bool(torch.isfinite(values).all()):  # one host sync per step, no more
        name, value = next((n, v) for n, v in zip(names, values.tolist(), strict=True)
                           if not math.isfinite(v))
        raise NonFiniteLossError(
            f"epoch {epoch}, step {step}: loss term {name!r} is {value} "
            f"(lower train.lr, check the data, or keep train.clip_max_norm > 0)")
    (total / grad_accum).backward()
    return names, values


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


def evaluate(model: nn.Module, postprocess: PostProcess, loader: Iterable, *,
             device: torch.device, precision: str = "fp32", channels_last: bool = False,
             progress: bool = True, masks: MaskOutputs | None = None
             ) -> dict[int, dict[str, Tensor]]:
    """Detections for every image of ``loader``, keyed by ``image_id``: ``boxes`` absolute
    xyxy in the original image's pixels (``orig_size``), ``scores``, ``labels`` (category ids
    if ``postprocess`` has a mapping); on the CPU. ``masks`` (a segmentation model): also
    each query's mask as COCO RLE (``masks``, a list) and the ``panoptic`` map if asked
    (:func:`detr.masks_out.segment_batch`)."""
    return _detect(model, postprocess, loader, device, precision, channels_last, progress,
                   layers=False, masks=masks)[-1]


def evaluate_layers(model: nn.Module, postprocess: PostProcess, loader: Iterable, *,
                    device: torch.device, precision: str = "fp32", channels_last: bool = False,
                    progress: bool = True, masks: MaskOutputs | None = None
                    ) -> list[dict[int, dict[str, Tensor]]]:
    """:func:`evaluate` for every decoder layer from one forward pass per batch: one dict of
    detections by image id per layer, the first decoder layer first; the last is the model's
    output (what :func:`evaluate` returns). A model without ``aux_outputs`` gives one."""
    return _detect(model, postprocess, loader, device, precision, channels_last, progress,
                   layers=True, masks=masks)


@torch.inference_mode()
def _detect(model: nn.Module, postprocess: PostProcess, loader: Iterable, device: torch.device,
            precision: str, channels_last: bool, progress: bool, layers: bool,
            masks: MaskOutputs | None = None) -> list[dict[int, dict[str, Tensor]]]:
    model.eval()
    predictions: list[dict[int, dict[str, Tensor]]] = []
    for batch in tqdm(loader, desc="evaluate", disable=not progress, dynamic_ncols=True):
        images, mask, targets = to_device(batch, device, channels_last)
        with autocast(device, precision):
            outputs = model(images, mask)
        sizes = torch.stack([t["orig_size"] for t in targets])
        heads = [*outputs.get("aux_outputs", []), outputs] if layers else [outputs]
        predictions = predictions or [{} for _ in heads]
        for found, head in zip(predictions, heads, strict=True):
            for target, det in zip(targets, postprocess(head, sizes), strict=True):
                found[int(target["image_id"])] = {k: v.cpu() for k, v in det.items()}
        if masks is not None and "pred_masks" in outputs:  # the last layer's queries only
            extra = segment_batch(outputs, targets, masks, _category_ids(postprocess))
            for target, more in zip(targets, extra, strict=True):
                predictions[-1][int(target["image_id"])].update(more)
    return predictions or [{}]


def _category_ids(postprocess: PostProcess) -> list[int] | None:
    ids = postprocess.label_to_category
    return None if ids is None else ids.tolist()
