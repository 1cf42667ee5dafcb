"""Settings that depend on the data, resolved from the dataset: ``auto`` in params.yaml.

A value of ``auto`` for one of :data:`AUTO_KEYS` is replaced, before training, by a rule
applied to the training split's annotations (:class:`DatasetProfile`) and the device. A number
in params.yaml always wins; :func:`resolve` reports every value of those keys, where it came
from (``rule`` or ``explicit``) and why, so the report says what was trained and the user
can pin any of it.

The rules, in the order they depend on each other (``S`` = the backbone's output stride; with
multi-scale features, ``model.feature_levels`` > 1, the finest level's stride: the level that
sees the small objects, while coarser levels add context for the large ones):

- ``data.scales`` / ``data.max_size``: the shorter side ``L`` at which the median object
  (square root of its box area) spans :data:`MEDIAN_CELLS` feature cells and the smallest
  tenth at least :data:`SMALL_CELLS`, up to 2x the image and no more than the device's
  per-step pixel budget allows at the smallest batch, rounded up to a multiple of 32. Scales
  are the multiples of 16 from 7/8 L to L (val: L); ``max_size`` keeps the dataset's aspect
  ratios (95th percentile, at most 5/3 as the paper's 800/1333).
- ``train.batch_size``: images of that size that fit the device's pixel budget per step
  (:data:`PIXELS_PER_STEP`), between 2 (the paper's per-GPU batch) and 32, at most the
  number of training images.
- ``train.lr`` / ``train.lr_backbone``: :data:`REF_LR` at a global batch (batch x processes x
  accumulation) of :data:`REF_BATCH` or more, scaled by the square root of the batch below it
  (the usual rule for Adam); the backbone's the same from scratch, a tenth of it from pretrained
  weights (``model.backbone_weights`` or ``train.init_weights``; the paper's 1e-5 to 1e-4).
- ``model.num_queries``: five per object of a busy image (95th percentile of objects per
  image), at least 1.5x the most objects in one image, rounded up to 10.
- ``train.steps`` / ``train.epochs``: at least :data:`MIN_STEPS` optimiser steps and at least
  :data:`MIN_EPOCHS` epochs, in whole epochs (the loop and checkpoints are per epoch), at
  most :data:`MAX_STEPS` of the device (CPU: ~15 minutes; a warning says when it cuts). A
  40-image set gets as many steps as a 4,000-image one.
- ``train.warmup_steps`` 1/15, ``train.eval_every_steps`` 1/6, ``train.log_every`` 1/60 of
  the steps; ``train.lr_drop`` (the step schedule) at 2/3 of the epochs, as the paper's
  200 of 300; ``train.eval_images``: as many val images as cost about the same pixels as 500
  at 128 px (0 = all).

Why these constants: the demo (256 px images, stride 8), which trains to its reported AP, has
its median object at 3.6 cells and its smallest tenth at 1.3 cells at its 128 px scale, and
converges in about 3,000 steps of 8 images of 128 px; the rules keep those ratios and that
per-step cost for any dataset (README, "Settings from your data").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detr.data.profile import DatasetProfile

AUTO = "auto"
# Feature cells the median object / the smallest tenth should span at the training scale.
MEDIAN_CELLS = 3.0
SMALL_CELLS = 1.0
MAX_UPSCALE = 2.0  # never enlarge images more than this
MIN_SIDE = 64
# Pixels per optimiser step (batch x H x W) by device type: CPU = the demo's 8 x 128 x 128,
# which runs at ~0.15 s/step on 2 cores; CUDA = 8 images at the paper's 800 x 1066.
PIXELS_PER_STEP = {"cpu": 8 * 128 * 128, "cuda": 8 * 800 * 1066}
MAX_SHORT_SIDE = {"cpu": 800, "cuda": 800}  # the paper's val scale
MIN_BATCH, MAX_BATCH = 2, 32
MIN_STEPS, MIN_EPOCHS = 3000, 12
# The demo's learning rate at its batch of 8; smaller batches scale by sqrt(batch / 8) (set A,
# batch 2: AP 0.027 at 5e-4 against 0.012 at 1e-3). Larger batches keep it (see README).
REF_LR, REF_BATCH = 1e-3, 8
# The default training's budget by device type: on the CPU ~15 min at the demo's ~0.15 s/step
MAX_STEPS = {"cpu": 6000, "cuda": 10**9}
EVAL_PIXELS = 500 * 128 * 128  # pixels of one evaluation during training (the demo's)
MAX_ASPECT = 1333 / 800

# Keys that may be ``auto``: (section, key).
AUTO_KEYS = (("model", "num_queries"), ("data", "scales"), ("data", "max_size"),
             ("train", "batch_size"), ("train", "steps"), ("train", "epochs"),
             ("train", "warmup_steps"), ("train", "eval_every_steps"), ("train", "eval_images"),
             ("train", "log_every"), ("train", "lr_drop"), ("train", "lr"),
             ("train", "lr_backbone"))


@dataclass(frozen=True)
class Setting:
    """One resolved value: ``source`` is ``rule`` (was auto) or ``explicit`` (params.yaml)."""

    key: str
    value: Any
    source: str
    why: str


@dataclass
class Resolution:
    """The resolved sections (plain dicts) and one :class:`Setting` per auto-able key."""

    sections: dict[str, dict]
    settings: list[Setting] = field(default_factory=list)
    profile: DatasetProfile | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def resolved(self) -> dict[str, Any]:
        """``{"model.num_queries": 30, ...}``: the values that were ``auto``."""
        return {s.key: s.value for s in self.settings if s.source == "rule"}

    def table(self) -> str:
        width = max((len(s.key) for s in self.settings), default=10)
        lines = [f"{s.key:<{width}}  {_show(s.value):>14}  {s.source:<8}  {s.why}"
                 for s in self.settings]
        return "\n".join(["settings (auto = resolved from the dataset; a number in params.yaml "
                          "wins):", *lines, *[f"warning: {w}" for w in self.warnings]])

    def to_json(self) -> dict:
        return {"profile": None if self.profile is None else vars(self.profile),
                "settings": [vars(s) for s in self.settings], "warnings": self.warnings}


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list) else str(value)


def object_scale(profile: DatasetProfile, stride: int) -> float:
    """The resize factor at which the median object spans MEDIAN_CELLS cells of ``stride`` px
    and the smallest tenth SMALL_CELLS, at most MAX_UPSCALE (``profile`` must have boxes)."""
    want = max(MEDIAN_CELLS * stride / profile.object_size_median,
               SMALL_CELLS * stride / max(profile.object_size_p10, 1.0))
    return min(want, MAX_UPSCALE)


def short_side_cap(profile: DatasetProfile, device: str) -> int:
    """The largest short side a batch of MIN_BATCH images of the data's aspect can have within
    the pixel budget of ``device`` (``cpu`` / ``cuda``), and the paper's 800."""
    aspect = profile.long_side / profile.short_side
    fit = math.sqrt(PIXELS_PER_STEP[device] / (MIN_BATCH * aspect))
    return min(MAX_SHORT_SIDE[device], int(fit // 32 * 32))


def needs_resolving(sections: dict[str, dict]) -> bool:
    return any(sections.get(sec, {}).get(key) == AUTO for sec, key in AUTO_KEYS)


def resolve(sections: dict[str, dict], profile: DatasetProfile, *, device: str = "cpu",
            val_images: int = 0, world_size: int = 1) -> Resolution:
    """``sections`` (``model``, ``data``, ``train`` as plain dicts) with every ``auto`` of
    :data:`AUTO_KEYS` replaced by its rule's value for ``profile`` on ``device`` (``cpu`` or
    ``cuda``). ``val_images``: size of the val split (for ``train.eval_images``);
    ``world_size``: processes sharing an epoch (for steps per epoch).

    Raises:
        ValueError: ``train.steps`` and ``train.epochs`` are both numbers (one sets the
            other), or a rule needs object sizes and the training split has no boxes.
    """
    out = {k: dict(v) for k, v in sections.items()}
    res = Resolution(out, profile=profile)
    _Rules(out, res, profile, "cuda" if device.startswith("cuda") else "cpu",
           val_images, world_size).run()
    return res


class _Rules:
    """Applies the module's rules in dependency order, recording each :class:`Setting`."""

    def __init__(self, sections, res, profile, device, val_images, world_size):
        self.s, self.res, self.p, self.device = sections, res, profile, device
        self.val_images, self.world_size = val_images, world_size

    def run(self) -> None:
        self.scales()
        self.batch_size()
        self.learning_rate()
        self.num_queries()
        self.length()
        self.cadence()

    def set(self, section: str, key: str, compute) -> Any:
        """The explicit value, or ``compute()`` -> (value, why) when it is ``auto``."""
        current = self.s[section].get(key, AUTO)
        name = f"{section}.{key}"
        if current != AUTO:
            self.res.settings.append(Setting(name, current, "explicit", "set in params.yaml"))
            return current
        value, why = compute()
        self.s[section][key] = value
        self.res.settings.append(Setting(name, value, "rule", why))
        return value

    # -- data.scales, data.max_size ---------------------------------------------------------
    def stride(self) -> int:
        from detr.models.backbone import finest_stride

        model = self.s["model"]
        return finest_stride(model.get("last_stage", "layer4"), model.get("dilation", False),
                             model.get("feature_levels", 1))

    def scales(self) -> None:
        self.set("data", "scales", self._scales)
        scales = self.s["data"]["scales"]
        self.set("data", "max_size", lambda: self._max_size(max(scales)))
        self._note_cells(max(scales))

    def _scales(self) -> tuple[list[int], str]:
        p, stride = self.p, self.stride()
        if p.object_size_median is None:
            raise ValueError("data.scales: auto needs boxes in the training split; set it")
        factor = object_scale(p, stride)
        side = max(MIN_SIDE, math.ceil(factor * p.short_side / 32) * 32)
        cap = short_side_cap(p, self.device)
        why = (f"median object {p.object_size_median:.0f} px -> {MEDIAN_CELLS:g} cells, "
               f"smallest 10% {p.object_size_p10:.0f} px -> >= {SMALL_CELLS:g} at stride "
               f"{stride}: short side {p.short_side:.0f} x {factor:.2f}")
        if side > cap:
            side = cap
            why += f", capped at {cap} (the {self.device} pixel budget per step)"
        low = math.ceil(side * 7 / 8 / 16) * 16
        return list(range(low, side + 1, 16)) if low < side else [side], why

    def _max_size(self, short: int) -> tuple[int, str]:
        aspect = min(self.p.aspect_p95, MAX_ASPECT)
        return (math.ceil(short * aspect / 32) * 32,
                f"long side for aspect {aspect:.2f} (95th percentile, at most 5/3)")

    def _note_cells(self, short: int) -> None:
        p, stride = self.p, self.stride()
        if p.object_size_median is None:
            return
        scale = min(short / p.short_side, self.s["data"]["max_size"] / p.long_side)
        median = p.object_size_median * scale / stride
        small = p.object_size_p10 * scale / stride
        if median < MEDIAN_CELLS * 0.75 or small < SMALL_CELLS * 0.75:
            self.res.warnings.append(
                f"at {short} px the median object spans {median:.1f} feature cells and the "
                f"smallest 10% {small:.1f} (stride {stride}; the rule wants {MEDIAN_CELLS:g} "
                f"and {SMALL_CELLS:g}): small objects will be missed. Train on a GPU, cut the "
                f"images into tiles (prepare.tile), or use a finer stride (model.last_stage)")

    # -- train.batch_size, model.num_queries -------------------------------------------------
    def batch_size(self) -> None:
        def rule():
            short = max(self.s["data"]["scales"])
            long = min(self.s["data"]["max_size"], short * self.p.long_side / self.p.short_side)
            fit = int(PIXELS_PER_STEP[self.device] // (short * long))
            value = max(MIN_BATCH, min(MAX_BATCH, fit, max(self.p.images, 1)))
            return value, (f"{PIXELS_PER_STEP[self.device]:,} px per step on {self.device} / "
                           f"{short}x{long:.0f} px images, in [{MIN_BATCH}, {MAX_BATCH}]")
        self.set("train", "batch_size", rule)

    def learning_rate(self) -> None:
        train = self.s["train"]
        batch = train["batch_size"] * self.world_size * train.get("grad_accum", 1)

        def rule():
            factor = math.sqrt(min(batch, REF_BATCH) / REF_BATCH)
            value = float(f"{REF_LR * factor:.2g}")
            return value, (f"{REF_LR:g} at a global batch of {REF_BATCH}" if factor == 1 else
                           f"{REF_LR:g} x sqrt({batch} / {REF_BATCH}) (global batch {batch})")
        lr = self.set("train", "lr", rule)
        pretrained = (self.s["model"].get("backbone_weights") is not None
                      or train.get("init_weights") is not None)
        self.set("train", "lr_backbone", lambda: (
            float(f"{lr / 10:.2g}"), "train.lr / 10 (pretrained weights)") if pretrained else (
            lr, "train.lr (the backbone trains from scratch)"))

    def num_queries(self) -> None:
        def rule():
            p = self.p
            value = math.ceil(max(5 * p.objects_p95, 1.5 * p.objects_max, 1) / 10) * 10
            return value, (f"5 x {p.objects_p95:g} objects (95th percentile per image), "
                           f">= 1.5 x {p.objects_max} (most in one image)")
        self.set("model", "num_queries", rule)

    # -- training length and cadence ------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        train = self.s["train"]
        per_step = train["batch_size"] * self.world_size
        batches = -(-self.p.images // per_step)
        return -(-batches // train.get("grad_accum", 1))

    def length(self) -> None:
        train, per_epoch = self.s["train"], self.steps_per_epoch()
        steps, epochs = train.get("steps", AUTO), train.get("epochs", AUTO)
        if steps not in (AUTO, None) and epochs != AUTO:
            raise ValueError(f"train.steps ({steps}) and train.epochs ({epochs}) are both set: "
                             f"set one, the other auto")
        if epochs != AUTO:
            self.set("train", "epochs", None)
            train["steps"] = epochs * per_epoch
            self.res.settings.append(Setting("train.steps", train["steps"], "rule",
                                             f"train.epochs x {per_epoch} steps per epoch"))
            return
        steps = self.set("train", "steps", lambda: self._steps(per_epoch))
        self.set("train", "epochs", lambda: (
            -(-steps // per_epoch), f"train.steps / {per_epoch} steps per epoch, rounded up"))
        train["steps"] = train["epochs"] * per_epoch

    def _steps(self, per_epoch: int) -> tuple[int, str]:
        want = max(MIN_STEPS, MIN_EPOCHS * per_epoch)
        why = f"at least {MIN_STEPS} steps and {MIN_EPOCHS} epochs of {per_epoch} steps"
        budget = MAX_STEPS[self.device]
        if want <= budget:
            return want, why
        self.res.warnings.append(
            f"train.steps: {MIN_EPOCHS} epochs would be {want} steps; the {self.device} budget "
            f"stops at {budget} ({budget / per_epoch:.1f} epochs). Set train.steps or "
            f"train.epochs for more, or train on a GPU")
        return budget, why + f", at most {budget} on {self.device}"

    def cadence(self) -> None:
        steps, epochs = self.s["train"]["steps"], self.s["train"]["epochs"]
        self.set("train", "warmup_steps", lambda: (round(steps / 15), "1/15 of the steps"))
        self.set("train", "eval_every_steps", lambda: (
            math.ceil(steps / 6), "6 evaluations in the training"))
        self.set("train", "eval_images", self._eval_images)
        self.set("train", "log_every", lambda: (max(1, steps // 60), "60 logged means"))
        self.set("train", "lr_drop", lambda: (
            max(1, round(epochs * 2 / 3)), "2/3 of the epochs (the step schedule)"))

    def _eval_images(self) -> tuple[int, str]:
        short = max(self.s["data"]["scales"])
        count = max(50, int(EVAL_PIXELS // (short * short)))
        if not self.val_images or self.val_images <= count:
            return 0, f"all val images (<= {count} at {short} px)"
        return count, f"{count} val images at {short} px cost as much as 500 at 128 px"


def resolve_configs(model_cfg, data_cfg, train_cfg, data_root: str | Path, *,
                    device: str = "cpu", world_size: int = 1):
    """:func:`resolve` for the typed sections of :mod:`detr.config` and a canonical dataset
    (``data_root/annotations/{train,val}.json``): returns ``(model_cfg, data_cfg, train_cfg,
    resolution)``, the configs without ``auto``. Configs without ``auto`` come back as they
    are, with a resolution that lists their values as explicit.

    Raises:
        ValueError: the annotations cannot be read, or a rule cannot apply (see
            :func:`resolve`); the message names the file or the key.
    """
    from detr.config import DataConfig, ModelConfig, TrainConfig, load_section, to_dict

    root = Path(data_root) / "annotations"
    profile = DatasetProfile.from_file(root / "train.json")
    val_images = _count_images(root / "val.json")
    sections = {"model": to_dict(model_cfg), "data": to_dict(data_cfg),
                "train": to_dict(train_cfg)}
    res = resolve(sections, profile, device=device, val_images=val_images,
                  world_size=world_size)
    typed = [load_section(cls, res.sections[name], name) for name, cls in
             (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig))]
    return (*typed, res)


def _count_images(path: Path) -> int:
    try:
        return len(json.loads(path.read_text()).get("images") or [])
    except (OSError, ValueError):
        return 0
