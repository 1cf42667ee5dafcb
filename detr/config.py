"""Typed, frozen configuration for the detector, loaded strictly.

Each dataclass mirrors one section of ``params.yaml``. ``load_section(cls, mapping, name)``
builds one from plain YAML data: an unknown key, a missing required key or a value of the wrong
type raises :class:`ConfigError` naming the dotted key (``model.hidden_dim``). Defaults are the
DETR paper's R50 recipe; the demo's ``params.yaml`` overrides them for CPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from detr.strict import (  # noqa: F401  (ConfigError, check_ranges, load_section: API)
    ConfigError,
    at_least,
    check_ranges,
    fraction,
    load_section,
    non_negative,
)

Auto = Literal["auto"]
TASKS = ("detection", "segmentation", "panoptic")  # model.task  # resolved from the dataset before training (detr.settings)


def given(**values: Any) -> dict[str, Any]:
    """The values that are not ``"auto"`` (the range checks apply to those only)."""
    return {k: v for k, v in values.items() if v != "auto"}


# model keys of the params before the aids had their own section (checkpoints still have them)
_FLAT_AID_KEYS = ("dense_aux", "dense_boxes", "query_groups", "dn_groups", "dn_box_noise",
                  "dn_label_noise", "dn_labels")
_TO_AIDS = "moved into model.aids: see params.yaml"


@dataclass(frozen=True)
class DenseConfig:
    """Dense auxiliary head (one-to-many, in the spirit of Co-DETR / H-DETR), training only
    (``model.aids.dense``): every encoder token is classified as the smallest ground-truth box
    that contains it (and the token under each box centre as that box), else "no object". It
    supervises the backbone and encoder per location from the first step."""

    # Each token assigned to a box also regresses that box, as distances from its centre to
    # the box's four sides (FCOS-style; L1 + GIoU with the matched terms' weights), the
    # per-location localisation signal that Co-DETR's auxiliary detection heads give.
    boxes: bool = False
    loss_coef: float = 1.0  # weight of the per-token class loss (loss_ce_dense)

    def __post_init__(self):
        non_negative("model.aids.dense", loss_coef=self.loss_coef)


@dataclass(frozen=True)
class QueryGroupsConfig:
    """Group DETR (Chen et al. 2023), training only (``model.aids.query_groups``): ``groups`` x
    num_queries queries in groups that do not attend to each other, each matched one-to-one to
    the targets: more positive supervision per step. Inference uses the first group only."""

    groups: int = 2

    def __post_init__(self):
        at_least("model.aids.query_groups", 2, groups=self.groups)


@dataclass(frozen=True)
class DenoisingConfig:
    """Denoising training (DN-DETR, Li et al. 2022), training only (``model.aids.denoising``):
    ``groups`` noisy copies of the ground truth enter the decoder as extra queries that must
    reconstruct their box and class; no matching needed."""

    groups: int = 5
    box_noise: float = 0.4  # box corners move by up to this fraction of half the size
    label_noise: float = 0.2  # probability that a query is shown a random label
    labels: bool = True  # False: denoising queries get only the noisy box, no label

    def __post_init__(self):
        at_least("model.aids.denoising", groups=self.groups)
        non_negative("model.aids.denoising", box_noise=self.box_noise)
        fraction("model.aids.denoising.label_noise", self.label_noise, closed=True)


@dataclass(frozen=True)
class AidsConfig:
    """Training-only aids (``model.aids``): each is null (off, the paper) or its section.
    Inference and exported models never use them; their parameters are training-only."""

    dense: DenseConfig | None = None
    query_groups: QueryGroupsConfig | None = None
    denoising: DenoisingConfig | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DETR detector (``model:`` in params.yaml)."""

    MOVED_KEYS: ClassVar[dict[str, str]] = dict.fromkeys(_FLAT_AID_KEYS, _TO_AIDS)

    num_classes: int = 91  # logits = num_classes + 1; the last one is "no object"
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    dilation: bool = False  # DC5: dilate the last ResNet stage (stride 16 instead of 32)
    # "layer3" / "layer2": stop the ResNet one / two stages early, stride 16 / 8 (for small
    # objects on small images, cheaper than DC5 and possible on resnet18/34). "layer4" = the paper.
    last_stage: Literal["layer2", "layer3", "layer4"] = "layer4"
    # Multi-scale features: the encoder sees the tokens of this many ResNet stages ending at
    # last_stage (2 with layer4: strides 16 and 32; 3: 8, 16 and 32), each with its own 1x1
    # projection and a learned level embedding added to its positions, and the decoder
    # attends to all of them (detr.models.multiscale). 1 = last_stage alone, the paper.
    feature_levels: int = 1
    # "frozen_bn" is the official choice for pretrained backbones; from scratch it is the
    # identity (no normalisation at all), so use "bn" or "gn" there.
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"
    freeze_stem: bool = True  # stem and layer1 frozen, as the official release
    # Zero padded pixels before every backbone convolution, so predictions do not depend on
    # the other images of a batch. False = the official behaviour (borders leak into padding).
    mask_padding: bool = True
    # None (random init), "imagenet" (torchvision IMAGENET1K_V1 weights) or a file path.
    backbone_weights: str | None = None
    position_embedding: Literal["sine", "learned"] = "sine"
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False  # the paper is post-norm
    num_queries: int | Auto = 100  # auto: from the most objects per image (detr.settings)
    aux_loss: bool = True
    # Training-only aids (dense head, query groups, denoising): see AidsConfig.
    aids: AidsConfig = dataclasses.field(default_factory=AidsConfig)
    # Positions in the values, not only in the attention's queries and keys (the paper adds
    # them there only; its Table 3 also trains them "at input"). In the paper's model no value
    # carries a position, so a decoder query's output does not say where it looked, and its
    # box head must learn that slowly. input_pos: the encoding is also added once to the
    # projected features before the encoder (so the memory carries it); value_pos: the
    # decoder's cross-attention adds it to its values as to its keys. No new parameters:
    # official checkpoints load either way. False = the paper.
    input_pos: bool = False
    value_pos: bool = False
    # What the model predicts: "detection" (boxes, the default), "segmentation" (boxes and an
    # instance mask per detection) or "panoptic" (things and stuff, a panoptic map out). The
    # last two add the paper's mask head (detr.models.segmentation) on top of the detector,
    # which then sits under ``detr.`` in the state dict, as in the official panoptic models.
    task: Literal["detection", "segmentation", "panoptic"] = "detection"
    # The paper's two-step recipe: train only the mask head on a trained detector (from
    # train.init_weights), whose weights stay frozen and in eval mode (no dropout, fixed
    # BatchNorm statistics; no training aids). False = train detector and mask head jointly.
    mask_head_only: bool = False

    def __post_init__(self):
        if self.task not in TASKS:  # load_section checks it too; this covers direct use
            raise ConfigError(f"model.task: {self.task!r} is not one of {', '.join(TASKS)}")
        if self.mask_head_only and self.task == "detection":
            raise ConfigError("model.mask_head_only: true needs a mask head: set model.task to "
                              "segmentation or panoptic, or mask_head_only to false")
        at_least("model", **given(num_classes=self.num_classes, nheads=self.nheads,
                                  dec_layers=self.dec_layers, dim_feedforward=self.dim_feedforward,
                                  num_queries=self.num_queries))
        at_least("model", 0, enc_layers=self.enc_layers)
        fraction("model.dropout", self.dropout)
        stages = int(self.last_stage.removeprefix("layer"))  # layerN: N stages up to it
        if not 1 <= self.feature_levels <= stages:
            raise ConfigError(f"model.feature_levels: {self.feature_levels!r} must be in 1.."
                              f"{stages} with model.last_stage {self.last_stage}, e.g. "
                              f"{min(max(self.feature_levels, 1), stages)}")
        # the sine encoding splits the channels between y and x; the heads split them evenly;
        # the denoising queries' box encoding gives each coordinate dim / 4 sine/cosine pairs
        step = math.lcm(2, self.nheads, 8 if self.aids.denoising else 1)
        if self.hidden_dim < step or self.hidden_dim % step:
            why = f"divisible by 2 and by model.nheads ({self.nheads})" + (
                " and by 8 (model.aids.denoising)" if self.aids.denoising else "")
            raise ConfigError(f"model.hidden_dim: {self.hidden_dim} must be {why}, e.g. "
                              f"{max(step, self.hidden_dim // step * step)}")


@dataclass(frozen=True)
class LossConfig:
    """Hungarian matching costs and loss weights (``loss:`` in params.yaml)."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {"dense_loss_coef": _TO_AIDS}

    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    ce_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    eos_coef: float = 0.1  # relative weight of the no-object class in the cross-entropy
    # IoU-aware class targets (the softmax form of VarifocalNet's IoU-aware score, as DETRs
    # use it in Stable-DINO and Align-DETR): a matched query's target puts IoU(its box, the
    # target box) on the class and the rest on "no object", so its score learns to rank it
    # by how well it is placed, which AP at high IoU rewards. The IoU carries no gradient.
    # False = the paper (the class gets all of it).
    iou_aware: bool = False
    # Mask losses (model.task segmentation / panoptic), on the matched queries' masks of the
    # last decoder layer: sigmoid focal loss (alpha 0.25, gamma 2) and DICE. Paper: 1 and 1.
    mask_coef: float = 1.0
    dice_coef: float = 1.0

    def __post_init__(self):
        non_negative("loss", **dataclasses.asdict(self))


@dataclass(frozen=True)
class DataConfig:
    """Input pipeline (``data:`` in params.yaml). Paper: short side 480..800 step 32 (val 800),
    long side <= 1333, crop branch 400/500/600 then a 384..600 px crop."""

    # auto: from the image and object sizes and the backbone stride (detr.settings)
    scales: tuple[int, ...] | Auto = tuple(range(480, 801, 32))
    max_size: int | Auto = 1333
    crop_scales: tuple[int, ...] | None = (400, 500, 600)
    crop_size: tuple[int, ...] = (384, 600)
    hflip: bool = True
    num_workers: int = 2

    def __post_init__(self):
        for key in ("scales", "crop_scales", "crop_size"):
            sizes = getattr(self, key)
            if sizes is not None and sizes != "auto" and (not sizes or min(sizes) < 1):
                raise ConfigError(f"data.{key}: {list(sizes)} must be a non-empty list of "
                                  f"positive sizes in pixels, e.g. [480, 512]")
        if len(self.crop_size) != 2 or self.crop_size[0] > self.crop_size[1]:
            raise ConfigError(f"data.crop_size: {list(self.crop_size)} must be [min, max], "
                              f"e.g. [384, 600]")
        at_least("data", **given(max_size=self.max_size))
        at_least("data", 0, num_workers=self.num_workers)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (``train:`` in params.yaml). Defaults are the paper's R50 recipe."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "eval_every": "now train.eval_every_steps, in optimiser steps: see params.yaml"}

    # auto (these and the other Auto fields): detr.settings resolves them from the dataset.
    # steps: the training length in optimiser steps, rounded up to whole epochs; set steps
    # or epochs (the other is derived); None = epochs as given.
    steps: int | Auto | None = None
    epochs: int | Auto = 500
    batch_size: int | Auto = 2  # per process; the global batch is batch_size x world size x grad_accum
    grad_accum: int = 1
    lr: float | Auto = 1e-4
    lr_backbone: float | Auto = 1e-5  # 0 freezes the whole backbone
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1  # 0 disables clipping
    lr_schedule: Literal["step", "cosine"] = "step"
    lr_drop: int | Auto = 400  # step schedule: epoch of the x0.1 drop (paper: 200 of 300, 400 of 500)
    warmup_steps: int | Auto = 0  # linear warmup from 0, in optimiser steps
    seed: int = 42
    device: str = "auto"  # auto, cpu, cuda, cuda:1 ...
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast where fast
    channels_last: bool = True
    # Val AP every eval_every_steps steps (0 = none) on the first eval_images (0 = all); stop
    # after early_stop_patience evaluations without a better AP (0 = never); ema_decay: average
    # of the weights, evaluated and kept as best.pth (0 = off). See detr/train.py.
    eval_every_steps: int | Auto = 0
    eval_images: int | Auto = 0
    early_stop_patience: int = 0
    ema_decay: float = 0.0
    log_every: int | Auto = 50  # optimiser steps per logged mean of the losses (callback, MLflow)
    # Fine-tune from a checkpoint (path or URL, e.g. the official DETR R50): every tensor is
    # loaded but a class head of another size, which starts fresh. None = from scratch.
    init_weights: str | None = None

    def __post_init__(self):
        at_least("train", **given(epochs=self.epochs, batch_size=self.batch_size,
                                  grad_accum=self.grad_accum, log_every=self.log_every))
        if self.steps not in (None, "auto"):
            at_least("train", steps=self.steps)
        if self.lr != "auto" and self.lr <= 0:
            raise ConfigError(f"train.lr: {self.lr} must be > 0, e.g. 1.0e-4")
        non_negative("train", **given(
            lr_backbone=self.lr_backbone, weight_decay=self.weight_decay,
            clip_max_norm=self.clip_max_norm, lr_drop=self.lr_drop,
            warmup_steps=self.warmup_steps, eval_every_steps=self.eval_every_steps,
            eval_images=self.eval_images, early_stop_patience=self.early_stop_patience))
        fraction("train.ema_decay", self.ema_decay)
        if self.early_stop_patience and not self.eval_every_steps:
            raise ConfigError(f"train.early_stop_patience: {self.early_stop_patience} needs "
                              f"train.eval_every_steps > 0 (it counts val evaluations)")


# The sections the detector library reads; the pipeline adds its own.
LIBRARY_SECTIONS = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig,
                    "train": TrainConfig}


def read_params(path: str | Path) -> dict:
    """The top-level mapping of a params YAML file (ConfigError naming the file otherwise)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read params: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def parse_params(data: dict, sections: dict[str, type], *, source: str | Path = "params",
                 other_sections: bool = True) -> dict:
    """Typed ``sections`` of a params mapping, strictly; a missing section takes defaults.
    ``other_sections=False`` also refuses top-level sections not in ``sections``."""
    unknown = sorted(set(data) - set(sections))
    if unknown and not other_sections:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r} "
                          f"(allowed: {', '.join(sorted(sections))})")
    try:
        return {name: load_section(cls, data.get(name), name) for name, cls in sections.items()}
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_params(path: str | Path, sections: dict[str, type] = LIBRARY_SECTIONS) -> dict:
    """Read ``sections`` of a params YAML file into their dataclasses (strictly); other
    top-level sections are left to their own readers."""
    return parse_params(read_params(path), sections, source=path)


def to_dict(cfg: Any) -> dict:
    """A config dataclass as plain data (tuples become lists), e.g. for a checkpoint."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}




def migrate_params(params: dict) -> dict:
    """Params in the layout before ``model.aids`` (flat ``model.dense_aux``, ``dense_boxes``,
    ``query_groups``, ``dn_groups``, ``dn_box_noise``, ``dn_label_noise``, ``dn_labels`` and
    ``loss.dense_loss_coef``, as older checkpoints store them) -> the current layout, where
    they are ``model.aids.dense`` / ``query_groups`` / ``denoising``. Current params come back
    unchanged. A new dict; ``params`` itself is not modified."""
    model, loss = dict(params.get("model") or {}), dict(params.get("loss") or {})
    old = {k: model.pop(k) for k in _FLAT_AID_KEYS if k in model}
    coef = loss.pop("dense_loss_coef", None)
    if not old and coef is None:
        return dict(params)
    if "aids" in model:
        raise ConfigError(f"model: both model.aids and the old flat keys {sorted(old)}; "
                          f"keep model.aids only")
    groups, dn_groups = old.get("query_groups", 1), old.get("dn_groups", 0)
    model["aids"] = {
        "dense": ({"boxes": old.get("dense_boxes", False), "loss_coef": 1.0 if coef is None
                   else coef} if old.get("dense_aux") else None),
        "query_groups": {"groups": groups} if groups != 1 else None,
        "denoising": ({"groups": dn_groups, "box_noise": old.get("dn_box_noise", 0.4),
                       "label_noise": old.get("dn_label_noise", 0.2),
                       "labels": old.get("dn_labels", True)} if dn_groups != 0 else None),
    }
    return {**params, "model": model, "loss": loss}
