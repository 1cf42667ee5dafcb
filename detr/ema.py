"""Exponential moving average (EMA) of a model's weights, for ``train.ema_decay``.

After every optimiser step ``ema = decay * ema + (1 - decay) * weights`` for each parameter
and floating-point buffer (BatchNorm statistics too); the first update copies the weights.
The averaging is torch's :class:`torch.optim.swa_utils.AveragedModel` with
:func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` (one fused ``lerp`` per device and dtype).
The averaged copy never trains: it is what validation during training evaluates and what
``best.pth`` keeps.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA:
    """The averaged copy of ``model`` (``.module``, same class and state_dict keys)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay!r} must be in (0, 1) (train.ema_decay)")
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                      use_buffers=True)
        self.averaged.requires_grad_(False)
        self.module.eval()

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def update(self, model: nn.Module) -> None:
        """Average in ``model``'s current weights (the model itself, not a DDP wrapper)."""
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        """``module.<key>`` for every weight, and ``n_averaged`` (updates so far)."""
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
