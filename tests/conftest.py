"""Shared fixtures: tiny model configs that run in milliseconds on a CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from detr.config import ModelConfig

TINY = ModelConfig(num_classes=5, backbone="resnet18", norm="bn", freeze_stem=False,
                   hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64,
                   dropout=0.0, num_queries=8)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return TINY


@pytest.fixture
def tiny_official_cfg() -> ModelConfig:
    """Tiny, but with the official (frozen BN, frozen stem) backbone."""
    return dataclasses.replace(TINY, norm="frozen_bn", freeze_stem=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
