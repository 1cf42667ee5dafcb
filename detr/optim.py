"""Optimiser and learning-rate schedule from the ``train:`` config section."""

from __future__ import annotations

import math

import torch
from torch import nn

from detr.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two parameter groups: ``main`` at ``lr`` and ``backbone`` at ``lr_backbone``.

    ``lr_backbone == 0`` freezes the backbone entirely (as the official code does).
    """
    backbone, main = [], []
    for name, param in model.named_parameters():
        if name.startswith(("backbone.", "detr.backbone.")):  # the segmentation model's too
            if cfg.lr_backbone <= 0:
                param.requires_grad_(False)
            elif param.requires_grad:
                backbone.append(param)
        elif param.requires_grad:
            main.append(param)
    groups = [{"params": main, "lr": cfg.lr, "name": "main"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr_backbone, "name": "backbone"})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimiser-step schedule: linear warmup over ``warmup_steps``, then ``step`` (x0.1 at
    epoch ``lr_drop``) or ``cosine`` (to 0 at the last step)."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    drop_at = cfg.lr_drop * steps_per_epoch

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        if cfg.lr_schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        return warm * (0.1 if step >= drop_at else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
