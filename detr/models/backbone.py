"""ResNet backbone with the official DETR module layout (``backbone.0.body.layer1...``).

The backbone maps normalised images [B, 3, H, W] with a padding mask [B, H, W] to the last
ResNet stage [B, C, H/32, W/32] (H/16 with DC5) and the mask resized to it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

# Channels of the last stage of each supported ResNet.
NUM_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
# The stages the official release trains; the stem and layer1 stay frozen.
TRAINABLE_STAGES = ("layer2", "layer3", "layer4")


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"model.norm: unknown normalisation {norm!r} (frozen_bn, bn, gn)")


def _imagenet_weights(name: str):
    """torchvision's ImageNet weights enum for ``name`` (V1, as the official release used)."""
    enum = torchvision.models.get_model_weights(name)
    return enum.IMAGENET1K_V1


class Backbone(nn.Module):
    """A torchvision ResNet truncated after ``layer4``.

    Args:
        name: resnet18 / resnet34 / resnet50 / resnet101.
        dilation: replace the stride of layer4 by dilation (DC5).
        norm: "frozen_bn" (official, for pretrained weights), "bn" or "gn" (from scratch).
        weights: None (random), "imagenet" (torchvision download) or a path to a ResNet
            state dict (torchvision key names, ``fc.*`` optional).
        freeze_stem: keep conv1/bn1 and layer1 frozen, as the official release.
        mask_padding: zero the padded area of every convolution's and pooling's input, so an
            image's features do not depend on the other images of its batch (exact with
            BatchNorm in eval mode; GroupNorm's statistics still see the padding). Without it
            (the official behaviour) border features leak into the padding and back.
    """

    def __init__(self, name: str, *, dilation: bool = False, norm: str = "frozen_bn",
                 weights: str | None = None, freeze_stem: bool = True, mask_padding: bool = True):
        super().__init__()
        if name not in NUM_CHANNELS:
            raise ValueError(f"model.backbone: unknown {name!r} (one of {sorted(NUM_CHANNELS)})")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"model.dilation (DC5) needs resnet50 or resnet101: torchvision's "
                             f"{name} blocks do not support dilation")
        tv_weights = _imagenet_weights(name) if weights == "imagenet" else None
        resnet = getattr(torchvision.models, name)(
            weights=tv_weights,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=_norm_layer(norm),
        )
        if weights not in (None, "imagenet"):
            _load_resnet_file(resnet, Path(weights))
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
        self.num_channels = NUM_CHANNELS[name]
        if freeze_stem:
            for pname, param in self.body.named_parameters():
                if not pname.startswith(TRAINABLE_STAGES):
                    param.requires_grad_(False)
        self.mask_padding = mask_padding
        self._padding: _PaddingMasks | None = None
        if mask_padding:
            for module in self.body.modules():
                if isinstance(module, nn.Conv2d | nn.MaxPool2d):
                    module.register_forward_pre_hook(self._mask_input)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """[B,3,H,W], [B,H,W] bool (True = padding, at the bottom/right) -> features [B,C,h,w],
        mask [B,h,w]."""
        masking = self.mask_padding and bool(mask.any())
        self._padding = _PaddingMasks(mask) if masking else None
        try:
            features = self.body(images)["0"]
        finally:
            padding, self._padding = self._padding, None
        if padding is not None:
            return features, ~padding.valid(features)[:, 0]
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:])[0].to(torch.bool)
        return features, mask

    def _mask_input(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._padding is None:
            return None
        x = args[0]
        return (x * self._padding.valid(x).to(x.dtype),)


class _PaddingMasks:
    """Valid-pixel masks of a padded batch at every resolution of the ResNet.

    Every strided layer of a ResNet maps a size n to ceil(n / 2) (kernel 7/3/1 with padding
    3/1/0), so at stride 2**k an image of height h covers ceil(h / 2**k) rows.
    """

    def __init__(self, mask: Tensor):
        self.full = mask.shape[-2:]
        self.heights = (~mask[:, :, 0]).sum(1)  # padding is at the bottom and right
        self.widths = (~mask[:, 0, :]).sum(1)
        self.cache: dict[tuple[int, int], Tensor] = {}

    def valid(self, x: Tensor) -> Tensor:
        """[B, 1, h, w] bool, True on real pixels, for a feature map ``x`` [B, C, h, w]."""
        size = tuple(x.shape[-2:])
        if size not in self.cache:
            stride = self._stride(size)
            rows = torch.arange(size[0], device=x.device) < -(-self.heights // stride)[:, None]
            cols = torch.arange(size[1], device=x.device) < -(-self.widths // stride)[:, None]
            self.cache[size] = (rows[:, :, None] & cols[:, None, :])[:, None]
        return self.cache[size]

    def _stride(self, size: tuple[int, ...]) -> int:
        for k in range(12):
            s = 2 ** k
            if (-(-self.full[0] // s), -(-self.full[1] // s)) == size:
                return s
        raise ValueError(f"feature map {size} is not a ResNet stride of the input {self.full}")


def _load_resnet_file(resnet: nn.Module, path: Path) -> None:
    """Load a torchvision-style ResNet state dict from ``path`` (classifier keys optional)."""
    from detr.checkpoint import CheckpointError, check_compatible, load_state_dict_file

    def keep(key: str) -> bool:
        return not key.startswith("fc.") and not key.endswith("num_batches_tracked")

    state = {k: v for k, v in load_state_dict_file(path).items() if keep(k)}
    own = {k: v for k, v in resnet.state_dict().items() if keep(k)}
    try:
        check_compatible(own, state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: not a {type(resnet).__name__} backbone: {exc}") from None
    resnet.load_state_dict(state, strict=False)


class Joiner(nn.Sequential):
    """``backbone.0`` = the ResNet, ``backbone.1`` = the positional encoding (official layout)."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(features [B,C,h,w], mask [B,h,w], pos [B,d,h,w])``."""
        features, mask = self[0](images, mask)
        pos = self[1](mask).to(features.dtype)
        return features, mask, pos
