"""ResNet backbone with the official DETR module layout (``backbone.0.body.layer1...``).

The backbone maps normalised images [B, 3, H, W] with a padding mask [B, H, W] to the last
ResNet stage [B, C, H/32, W/32] (H/16 with DC5) and the mask resized to it.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from detr import downloads

# Channels of the last stage of each supported ResNet.
NUM_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
# The stages the official release trains; the stem and layer1 stay frozen.
TRAINABLE_STAGES = ("layer2", "layer3", "layer4")
# Where the ResNet may end: each stage earlier halves the stride and the channels.
LAST_STAGES = ("layer2", "layer3", "layer4")
# Every stage whose output can be returned (strides 4, 8, 16, 32; layer4 16 with DC5).
STAGES = ("layer1", "layer2", "layer3", "layer4")


def output_stride(last_stage: str = "layer4", dilation: bool = False) -> int:
    """Pixels per feature cell of the backbone's output: 8 / 16 / 32 for layer2 / 3 / 4,
    16 for a dilated layer4 (DC5). From the architecture alone (no model is built)."""
    if last_stage not in LAST_STAGES:
        raise ValueError(f"model.last_stage: unknown {last_stage!r} (one of {LAST_STAGES})")
    stride = 8 << LAST_STAGES.index(last_stage)
    return stride // 2 if dilation and last_stage == "layer4" else stride


def feature_stages(last_stage: str = "layer4", feature_levels: int = 1) -> tuple[str, ...]:
    """The ``feature_levels`` ResNet stages that end at ``last_stage``, finest first: the
    levels the transformer sees (``model.feature_levels``; 1 = ``last_stage`` alone)."""
    end = STAGES.index(last_stage) + 1
    if not 1 <= feature_levels <= end:
        raise ValueError(f"model.feature_levels: {feature_levels!r} must be in 1..{end} with "
                         f"model.last_stage {last_stage!r} (stages {STAGES[:end]}), e.g. "
                         f"{min(max(feature_levels, 1), end)}")
    return STAGES[end - feature_levels: end]


def finest_stride(last_stage: str = "layer4", dilation: bool = False,
                  feature_levels: int = 1) -> int:
    """Pixels per feature cell of the finest level the transformer sees: what small objects
    get (the scale rule of :mod:`detr.settings` uses it). :func:`output_stride` with one level;
    each earlier stage halves it (layer1: 4)."""
    stages = feature_stages(last_stage, feature_levels)
    if len(stages) == 1:
        return output_stride(last_stage, dilation)
    return 4 << STAGES.index(stages[0])


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
    """A torchvision ResNet truncated after ``layer4`` (or ``layer3`` / ``layer2``).

    Args:
        name: resnet18 / resnet34 / resnet50 / resnet101.
        dilation: replace the stride of layer4 by dilation (DC5).
        last_stage: "layer4" (the paper, stride 32), "layer3" or "layer2": stop one or two
            stages earlier, for features at stride 16 or 8 with fewer channels and less compute
            than DC5 (small objects on small images; resnet18/34, which cannot dilate, too).
            The stages after it are not built.
        norm: "frozen_bn" (official, for pretrained weights), "bn" or "gn" (from scratch).
        weights: None (random), "imagenet" (torchvision download) or a ResNet state dict
            (torchvision key names, ``fc.*`` optional; :func:`detr.hub.build` reads files).
        freeze_stem: keep conv1/bn1 and layer1 frozen, as the official release.
        levels: stages returned by :meth:`forward_levels` besides ``last_stage`` (e.g.
            ``("layer1", "layer2", "layer3")`` for the mask head, ``("layer2", "layer3")`` for
            multi-scale features); each at or before ``last_stage``. Adds no parameters.
        mask_padding: zero the padded area of every convolution's and pooling's input, so an
            image's features do not depend on the other images of its batch (exact with
            BatchNorm in eval mode; GroupNorm's statistics still see the padding). Without it
            (the official behaviour) border features leak into the padding and back.
    """

    def __init__(self, name: str, *, dilation: bool = False, norm: str = "frozen_bn",
                 weights: str | dict[str, Tensor] | None = None, freeze_stem: bool = True, mask_padding: bool = True,
                 last_stage: str = "layer4", levels: tuple[str, ...] = ()):
        super().__init__()
        if name not in NUM_CHANNELS:
            raise ValueError(f"model.backbone: unknown {name!r} (one of {sorted(NUM_CHANNELS)})")
        if last_stage not in LAST_STAGES:
            raise ValueError(f"model.last_stage: unknown {last_stage!r} (one of {LAST_STAGES})")
        for level in levels:
            if level not in STAGES[: STAGES.index(last_stage) + 1]:
                raise ValueError(f"backbone level {level!r}: not a stage at or before "
                                 f"model.last_stage {last_stage!r} (one of {STAGES})")
        if dilation and last_stage != "layer4":
            raise ValueError(f"model.dilation (DC5) dilates layer4, which last_stage: {last_stage} "
                             "leaves out; use one or the other")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"model.dilation (DC5) needs resnet50 or resnet101: torchvision's "
                             f"{name} blocks do not support dilation")
        tv_weights = _imagenet_weights(name) if weights == "imagenet" else None
        try:
            resnet = getattr(torchvision.models, name)(
                weights=tv_weights,
                replace_stride_with_dilation=[False, False, dilation],
                norm_layer=_norm_layer(norm),
            )
        except OSError as exc:  # model.backbone_weights: imagenet, and no network
            if tv_weights is None or not downloads.is_download_error(exc):
                raise
            raise downloads.WeightsUnavailableError(
                "model.backbone_weights: imagenet: " + downloads.unavailable(tv_weights.url, exc)
            ) from exc
        if isinstance(weights, dict):
            _load_resnet_state(resnet, weights)
        # layer3 has half layer4's channels. IntermediateLayerGetter keeps the children up to
        # the returned one, so with "layer3" there is no layer4 (with "layer2", no layer3 either).
        self.num_channels = _channels(name, last_stage)
        self.last_stage = last_stage
        self.levels = tuple(s for s in STAGES if s in levels or s == last_stage)
        self.level_channels = tuple(_channels(name, s) for s in self.levels)
        self.body = IntermediateLayerGetter(resnet, return_layers={s: s for s in self.levels})
        if freeze_stem:
            for pname, param in self.body.named_parameters():
                if not pname.startswith(TRAINABLE_STAGES):
                    param.requires_grad_(False)
        self.mask_padding = mask_padding
        self._padding: _PaddingMasks | None = None
        self._stride_table: _Strides | None = None
        if mask_padding:
            for module in _masked_modules(self.body):
                module.register_forward_pre_hook(self._mask_input)

    def forward(self, images: Tensor, mask: Tensor,
                padded: bool | None = None) -> tuple[Tensor, Tensor]:
        """[B,3,H,W], [B,H,W] bool (True = padding, at the bottom/right) -> features [B,C,h,w],
        mask [B,h,w] of ``last_stage``.

        ``padded``: whether ``mask`` marks any padding. None looks at the mask, a
        data-dependent branch that ``torch.export`` cannot trace: an exported graph passes
        True (mask applied, exact with or without padding) or False (the mask is all False).
        """
        return self.forward_levels(images, mask, padded)[-1]

    def forward_levels(self, images: Tensor, mask: Tensor,
                       padded: bool | None = None) -> list[tuple[Tensor, Tensor]]:
        """As :meth:`forward`, for every stage of ``levels`` in stride order (the last is
        ``last_stage``): ``[(features [B,C_l,h_l,w_l], mask [B,h_l,w_l]), ...]``. With
        ``mask_padding`` each level's mask is exact: True on the cells that see only padding."""
        if padded is None:
            padded = bool(mask.any())
        masking = self.mask_padding and padded
        self._padding = _PaddingMasks(mask, self._strides()) if masking else None
        try:
            outputs = self.body(images)
        finally:
            padding, self._padding = self._padding, None
        levels = []
        for name in self.levels:
            features = outputs[name]
            if padding is not None:
                level_mask = ~padding.valid(features, self._strides().levels[name])[:, 0]
            else:
                level_mask = F.interpolate(mask[None].float(),
                                           size=features.shape[-2:])[0].to(torch.bool)
            levels.append((features, level_mask))
        return levels

    @property
    def stride(self) -> int:
        """Input pixels per output feature cell: 32 (``layer4``), 16 (``layer3``, or DC5), 8
        (``layer2``)."""
        return self._strides().output

    def stage_stride(self, stage: str) -> int:
        """Input pixels per feature cell of ``stage`` (one of :attr:`levels`)."""
        return self._strides().levels[stage]

    def _mask_input(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._padding is None:
            return None
        x = args[0]
        return (x * self._padding.valid(x, self._padding.strides.inputs[module]).to(x.dtype),)

    def _strides(self) -> _Strides:
        """The strides of the ResNet, found once by a shape-only probe (architecture only)."""
        if self._stride_table is None:
            self._stride_table = _probe_strides(self.body)
        return self._stride_table


class _Strides(NamedTuple):
    """``inputs``: the stride of each masked module's input; ``output``: of the features of
    the last stage; ``levels``: of each returned stage's features, by name."""

    inputs: dict[nn.Module, int]
    output: int
    levels: dict[str, int]


_PROBE_SIZE = 64  # px: a multiple of every ResNet stride (<= 32) that keeps them distinct


def _probe_strides(body: nn.Module) -> _Strides:
    """Strides of ``body``'s masked modules, from one forward pass on the meta device: sizes
    only, no compute, no side effect on the weights or the BatchNorm statistics. Fixed
    strides (not sizes compared at run time) keep the masked path traceable with dynamic
    image sizes."""
    sizes: dict[nn.Module, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        sizes[module] = args[0].shape[-1]

    handles = [m.register_forward_pre_hook(record) for m in _masked_modules(body)]
    state = {name: torch.empty_like(t, device="meta") for name, t in
             [*body.named_parameters(), *body.named_buffers()]}
    try:
        with torch.no_grad():
            out = torch.func.functional_call(
                body, state, (torch.empty(1, 3, _PROBE_SIZE, _PROBE_SIZE, device="meta"),))
    finally:
        for handle in handles:
            handle.remove()
    levels = {name: _PROBE_SIZE // t.shape[-1] for name, t in out.items()}
    return _Strides({m: _PROBE_SIZE // size for m, size in sizes.items()},
                    levels[list(levels)[-1]], levels)


def _channels(name: str, stage: str) -> int:
    """Output channels of ``stage`` of ResNet ``name``: each stage halves the next's."""
    return NUM_CHANNELS[name] >> (3 - STAGES.index(stage))


def _masked_modules(body: nn.Module) -> list[nn.Module]:
    """The modules whose input the padding mask zeroes: every convolution and pooling."""
    return [m for m in body.modules() if isinstance(m, nn.Conv2d | nn.MaxPool2d)]


class _PaddingMasks:
    """Valid-pixel masks of a padded batch at every resolution of the ResNet.

    Every strided layer of a ResNet maps a size n to ceil(n / 2) (kernel 7/3/1 with padding
    3/1/0), so at stride s an image of height h covers ceil(h / s) rows.
    """

    def __init__(self, mask: Tensor, strides: _Strides):
        self.strides = strides
        self.heights = (~mask[:, :, 0]).sum(1)  # padding is at the bottom and right
        self.widths = (~mask[:, 0, :]).sum(1)
        self.cache: dict[int, Tensor] = {}

    def valid(self, x: Tensor, stride: int) -> Tensor:
        """[B, 1, h, w] bool, True on real pixels, for a feature map ``x`` [B, C, h, w] at
        ``stride``."""
        if stride not in self.cache:
            rows = torch.arange(x.shape[-2], device=x.device) < -(-self.heights // stride)[:, None]
            cols = torch.arange(x.shape[-1], device=x.device) < -(-self.widths // stride)[:, None]
            self.cache[stride] = (rows[:, :, None] & cols[:, None, :])[:, None]
        return self.cache[stride]


def _load_resnet_state(resnet: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a torchvision-style ResNet state dict (classifier keys optional); ValueError
    naming the first differences if it is another network."""

    def keep(key: str) -> bool:
        return not key.startswith("fc.") and not key.endswith("num_batches_tracked")

    state = {k: v for k, v in state.items() if keep(k)}
    own = {k: v for k, v in resnet.state_dict().items() if keep(k)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"not a {type(resnet).__name__} backbone: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                         f"{len(shapes)} shape mismatches {shapes[:1]}")
    resnet.load_state_dict(state, strict=False)


class JoinerOutput(NamedTuple):
    """What :class:`Joiner` returns (see its ``forward``)."""

    features: Tensor
    mask: Tensor
    pos: Tensor
    levels: list[tuple[Tensor, Tensor]]


class Joiner(nn.Sequential):
    """``backbone.0`` = the ResNet, ``backbone.1`` = the positional encoding (official layout)."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor,
                padded: bool | None = None) -> JoinerOutput:
        """Return ``(features [B,C,h,w], mask [B,h,w], pos [B,d,h,w], levels)`` of the last
        stage, ``levels`` = every level of the backbone as ``[(features, mask), ...]`` in
        stride order (the last is ``(features, mask)``; the mask head reads the others);
        ``padded``: see :meth:`Backbone.forward`."""
        levels = self[0].forward_levels(images, mask, padded)
        features, mask = levels[-1]
        pos = self[1](mask).to(features.dtype)
        return JoinerOutput(features, mask, pos, levels)

    def forward_levels(self, images: Tensor, mask: Tensor, padded: bool | None = None
                       ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``(features, mask, pos)`` for every level of the backbone, in stride order (the
        last is what :meth:`forward` returns)."""
        return [(f, m, self[1](m).to(f.dtype))
                for f, m in self[0].forward_levels(images, mask, padded)]


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for inference in which every BatchNorm that directly follows a
    convolution (``convN``/``bnN`` siblings and ``Sequential(conv, bn)``, as in torchvision's
    ResNets) is folded into that convolution's weight and bias, and replaced by an identity.

    Frozen or eval-mode BatchNorm is a per-channel affine map, so the outputs are the same up to
    float rounding, with one pass over each activation and several kernel launches fewer per
    layer. Tensors that are not folded are shared with ``module``, not copied; hooks (the padding
    masks) and the stride table follow the copy. ``module`` itself is left untouched.
    """
    if module.training:
        raise ValueError("fold_batchnorm: the model must be in eval mode (running statistics)")
    shared = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    folded = copy.deepcopy(module, memo=shared)
    for parent in list(folded.modules()):
        children = dict(parent.named_children())
        pairs = [(c, n) for n in children if n.startswith("bn")
                 for c in [f"conv{n[2:]}"] if c in children]
        if isinstance(parent, nn.Sequential):
            names = list(children)
            pairs += list(zip(names, names[1:], strict=False))
        for conv_name, bn_name in pairs:
            conv, bn = children[conv_name], children[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, _FOLDABLE):
                conv.weight, conv.bias = fuse_conv_bn_weights(
                    conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                    bn.bias)
                conv.weight.requires_grad_(False)
                conv.bias.requires_grad_(False)
                setattr(parent, bn_name, nn.Identity())
    return folded


_FOLDABLE = (nn.BatchNorm2d, FrozenBatchNorm2d)
