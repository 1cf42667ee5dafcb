"""``params.yaml``: every section typed and strict, read once.

Library sections (``model``, ``loss``, ``data``, ``train``) are defined in :mod:`detr.config`;
the pipeline's own (``prepare``, ``validate``, ``evaluate``, ``register``, ``schedule``,
``alerts``) here. An unknown section, an unknown key or a wrong type is an error naming it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from detr.config import LIBRARY_SECTIONS, ConfigError, check_ranges, parse_params, read_params

PARAMS_FILE = Path("params.yaml")


def project_root() -> Path:
    """The DVC project root (``DVC_ROOT`` inside a stage), else the working directory: where
    ``params.yaml``, ``dvc.lock``, the MLflow store and the servers' state are."""
    return Path(os.environ.get("DVC_ROOT", ".")).resolve()


@dataclass(frozen=True)
class DemoConfig:
    """The built-in synthetic dataset (``prepare.demo``)."""

    num_train: int = 2000
    num_val: int = 500
    image_size: int = 256
    max_objects: int = 6
    seed: int = 0
    stuff: int = 3  # stuff classes painted as background regions when model.task is panoptic

    def __post_init__(self) -> None:
        # 6 = detr.data.synthetic_stuff.MAX_STUFF (not imported: the stages would depend on
        # the generator's code; tests/unit/test_synthetic_masks.py checks they agree)
        check_ranges("prepare.demo", self, {"stuff": 0 <= self.stuff <= 6})


@dataclass(frozen=True)
class TileConfig:
    """Tiling of large images (``prepare.tile``; null = off): every image with a side longer
    than ``min_image_side`` px becomes ``size`` x ``size`` tiles overlapping by at least
    ``overlap`` of a tile (:func:`detr.data.tiling.tile_grid`); a box keeps the part inside
    a tile when at least ``min_visible`` of its area is there, else that tile drops it."""

    size: int = 512
    overlap: float = 0.2
    min_image_side: int = 1024
    min_visible: float = 0.5

    def __post_init__(self) -> None:
        check_ranges("prepare.tile", self, {"size": self.size >= 16,
                                            "overlap": 0 <= self.overlap < 1,
                                            "min_visible": 0 < self.min_visible <= 1})
        if self.min_image_side < self.size:
            raise ConfigError(f"prepare.tile.min_image_side: {self.min_image_side} is below "
                              f"prepare.tile.size ({self.size}): an image that fits in one "
                              f"tile is not tiled; raise it to at least the tile size")


@dataclass(frozen=True)
class PrepareConfig:
    """Where the data comes from (``prepare:``)."""

    # "demo" (the built-in synthetic dataset) or a path, relative to the project, read as
    # ``format``: auto = whichever layout of detr.data.detect_layout it is (COCO release,
    # Roboflow's COCO export, canonical, YOLO data.yaml, VOC; printed); coco = one of the COCO
    # layouts, or one COCO json (its images in ``image_dir``); voc = a VOC year folder
    # (Annotations/, JPEGImages/); yolo = a data.yaml, or a folder with images/ and labels/.
    source: str = "demo"
    format: Literal["auto", "coco", "coco_panoptic", "voc", "yolo"] = "auto"
    image_dir: str | None = None
    val_fraction: float = 0.2  # when the source has no train/val split
    seed: int = 0
    link: Literal["symlink", "hardlink", "copy"] = "hardlink"
    demo: DemoConfig = DemoConfig()
    # null: images as they are; auto: tiles when the objects need a larger scale than the
    # device's budget allows for whole images (detr.auto_tiles.tile_rule)
    tile: TileConfig | Literal["auto"] | None = None

    def __post_init__(self) -> None:
        choices = {"format": ("auto", "coco", "coco_panoptic", "voc", "yolo"),
                   "link": ("symlink", "hardlink", "copy")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"prepare.{key}: {getattr(self, key)!r} is not one of "
                                  f"{', '.join(allowed)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"prepare.val_fraction: {self.val_fraction!r} must be in [0, 1)")


@dataclass(frozen=True)
class EvaluateTileConfig:
    """Tiled prediction in the evaluate stage (``evaluate.tile``; null = off): val is
    evaluated on whole images (a tiled dataset's ``annotations/val_whole.json``, else
    ``val.json``), each predicted tile by tile like ``python -m detr.predict --tile``
    (:class:`detr.data.tiling.TileOptions`): the AP a user gets on their large images.
    ``size``: tile side in px, or ``auto`` (the val scale: ``min(max(data.scales),
    data.max_size)``)."""

    size: int | Literal["auto"] = "auto"
    overlap: float = 0.2
    whole: bool = False  # also the whole image, downscaled, merged in
    match: Literal["ios", "iou"] = "ios"  # duplicates across tiles: by IoS or IoU (NMS)...
    threshold: float = 0.5  # ...at this value, class-wise
    fuse: bool = False  # weighted box fusion of each merged group

    def __post_init__(self) -> None:
        check_ranges("evaluate.tile", self, {
            "size": self.size == "auto" or self.size >= 16,
            "overlap": 0 <= self.overlap < 1, "threshold": 0 < self.threshold <= 1})


@dataclass(frozen=True)
class EvaluateConfig:
    """How the val split is evaluated and shown (``evaluate:``)."""

    batch_size: int = 4
    num_examples: int = 8  # val images drawn with predictions vs ground truth
    score_threshold: float = 0.5  # drawings, duplicate count; COCO AP uses every detection
    attention_images: int = 2  # val images drawn with the decoder attention of...
    attention_queries: int = 4  # ...their best-scoring queries (0 images: none drawn)
    # tiled prediction on whole val images; auto: as prepare tiled the dataset (its
    # annotations/tiling.json: the same tile size), else off (pipelines.measurement.with_tile)
    tile: EvaluateTileConfig | Literal["auto"] | None = None
    # class-wise NMS at this IoU on the model's detections (None = off, DETR as it is): what
    # is measured here, re-measured on the champion and served by the registered model
    nms: float | None = None
    # model.task: panoptic: the queries scoring over it make the panoptic map (paper: 0.85)
    panoptic_threshold: float = 0.5

    def __post_init__(self) -> None:
        checks = {"batch_size": self.batch_size >= 1, "num_examples": self.num_examples >= 0,
                  "nms": self.nms is None or 0 < self.nms <= 1,
                  "panoptic_threshold": 0 <= self.panoptic_threshold < 1,
                  "score_threshold": 0 <= self.score_threshold <= 1,
                  "attention_images": self.attention_images >= 0,
                  "attention_queries": self.attention_queries >= 1}
        check_ranges("evaluate", self, checks)


@dataclass(frozen=True)
class DriftConfig:
    """How far today's dataset may move from the champion's (``register.drift:``).

    Each threshold bounds one statistic's distance (:mod:`pipelines.registry.drift`): a
    Jensen-Shannon distance (base 2, 0 = same histogram, 1 = disjoint) for the histograms, and
    for colour the largest per-channel shift of the mean in units of the champion's std. Past
    a threshold the data has drifted: the report says so, the retrain alerts; with ``gate``
    the new version also stays ``@challenger``.
    """

    class_balance: float = 0.2  # boxes per class
    boxes_per_image: float = 0.2  # histogram 0, 1, ..., 15, 16+
    box_size: float = 0.2  # sqrt(box area) px, half-octave bins
    image_size: float = 0.2  # the longer side px, half-octave bins
    colour: float = 0.5  # max over R, G, B of |mean - champion's mean| / champion's std
    sample_images: int = 64  # images decoded (evenly spaced, 64 px thumbnails) for colour
    gate: bool = False  # true: a drifted dataset's version is never @champion automatically

    def __post_init__(self) -> None:
        distances = ("class_balance", "boxes_per_image", "box_size", "image_size")
        checks = {key: 0 <= getattr(self, key) <= 1 for key in distances}
        checks.update(colour=self.colour >= 0, sample_images=self.sample_images >= 1)
        check_ranges("register.drift", self, checks)


@dataclass(frozen=True)
class RegisterConfig:
    """Model registry and the alias rule (``register:``)."""

    # None: derived from the dataset by load(): detr-<prepare.source folder> (model_name_for)
    model_name: str | None = None
    # One of the 12 COCO statistics in metrics/coco.json (detr.evaluation.STAT_NAMES), or with
    # masks a mask_* one (metrics/segm.json) or a PQ one (metrics/panoptic.json): checked
    # first thing by the register stage (register.read_metric, naming register.metric), which
    # imports detr.evaluation anyway; here it would load torch wherever params.yaml is read.
    metric: str = "AP"
    # Below this a version is registered but never @champion. The demo's model, untrained,
    # scores AP 0.00001-0.00008 on the demo's val split (3 seeds): 0.02 keeps it (and a
    # training that failed to learn) out, far below a trained demo model (~0.19).
    min_ap: float = 0.02
    min_improvement: float = 0.0  # ...and beat the champion (same val split) by this much
    max_class_drop: float = 0.1  # ...and no class may lose more AP than this against it
    drift: DriftConfig = DriftConfig()  # today's data against the champion's

    def __post_init__(self) -> None:
        name_ok = self.model_name is None or bool(self.model_name.strip())
        check_ranges("register", self, {"model_name": name_ok,
                                        "min_ap": 0 <= self.min_ap <= 1,
                                        "min_improvement": self.min_improvement >= 0,
                                        "max_class_drop": 0 <= self.max_class_drop <= 1})


def model_name_for(source: str) -> str:
    """The registered model's default name for ``prepare.source``: ``detr-demo`` for the demo,
    else ``detr-<last folder name of the path, as a slug>`` (``data/raw/My Boats`` ->
    ``detr-my-boats``; a file such as ``data.yaml`` names its folder)."""
    if source == "demo":
        return "detr-demo"
    path = Path(source)
    stem = path.parent.name if path.suffix else path.name
    slug = re.sub(r"[^a-z0-9]+", "-", (stem or path.resolve().name).lower()).strip("-")
    return f"detr-{slug or 'data'}"


@dataclass(frozen=True)
class ValidateConfig:
    """Bounds of the dataset checks (``validate:`` in params.yaml)."""

    box_tolerance_px: float = 1.0  # how far (px) a box may reach past the image border
    min_box_side_px: float = 0.0  # boxes must be strictly wider and taller than this
    area_tolerance: float = 0.01  # `area` may exceed w * h by this fraction (rounding)
    min_boxes_per_image: int = 0  # 0: images without objects are allowed (DETR handles them)
    max_boxes_per_image: int = 100
    # the model's; must be larger than the most boxes in one image. None (model.num_queries:
    # auto): not checked, the train stage sets it from the most boxes in one image
    num_queries: int | None = 100
    min_train_boxes_per_class: int = 1  # every category needs training examples
    min_class_fraction: float = 0.001  # of all non-crowd train boxes, per category
    max_class_imbalance: float = 1000.0  # largest class's train boxes / smallest class's
    workers: int = 2  # processes for the per-image file checks (read, hash, decode)
    max_examples: int = 20  # offending records kept per expectation
    # check the annotations' masks (segmentation); default: model.task is not detection
    masks: bool = False
    mask_area_tolerance: float = 0.1  # a mask's pixels may differ from `area` by this fraction
    mask_box_tolerance_px: float = 2.0  # ...and its box from `bbox` by this (+10% of the side)

    def __post_init__(self) -> None:
        checks = {
            "mask_area_tolerance": self.mask_area_tolerance >= 0,
            "mask_box_tolerance_px": self.mask_box_tolerance_px >= 0,
            "box_tolerance_px": self.box_tolerance_px >= 0,
            "min_box_side_px": self.min_box_side_px >= 0,
            "area_tolerance": self.area_tolerance >= 0,
            "max_boxes_per_image": self.max_boxes_per_image >= self.min_boxes_per_image >= 0,
            "num_queries": self.num_queries is None or self.num_queries >= 1,
            "min_class_fraction": 0 <= self.min_class_fraction <= 1,
            "max_class_imbalance": self.max_class_imbalance >= 1,
            "workers": self.workers >= 1,
            "max_examples": self.max_examples >= 1,
        }
        check_ranges("validate", self, checks)


@dataclass(frozen=True)
class ScheduleConfig:
    """The scheduled ``retrain`` deployment (``schedule:``; ``make deploy`` applies it)."""

    cron: str = "0 3 * * 1"  # Mondays 03:00; also editable, pausable in the Prefect UI
    timezone: str = "UTC"  # IANA name, e.g. Europe/Paris
    deployment: str = "weekly"  # shown in Prefect as retrain/<deployment>
    work_pool: str = "detr-ops"  # a process work pool; `make serve` starts its worker
    lock_wait_s: float = 3600.0  # a retrain started while another trains waits this long
    push: bool = True  # `dvc push` after the run when a default DVC remote is configured

    def __post_init__(self) -> None:
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except ValidationError as exc:
            problem = "; ".join(e["msg"] for e in exc.errors())
            raise ConfigError(f"schedule: cron {self.cron!r} / timezone {self.timezone!r}: "
                              f"{problem}") from None
        if self.lock_wait_s < 0:
            raise ConfigError(f"schedule.lock_wait_s: {self.lock_wait_s!r} is negative")
        for key in ("deployment", "work_pool"):
            if not getattr(self, key).strip():
                raise ConfigError(f"schedule.{key}: empty name")


ALERT_CHANNELS = ("none", "webhook", "slack", "teams", "apprise")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class AlertsConfig:
    """Notifications of the ``retrain`` flow (``alerts:``; :mod:`pipelines.ops.alerts`).

    The URL (and a webhook's token) are secrets: params name the environment variables that
    hold them, never the values.
    """

    # none (off) | webhook (JSON POST: Prefect's CustomWebhookNotificationBlock) | slack |
    # teams (their incoming-webhook URLs) | apprise (any Apprise URL: mailto:// for e-mail,
    # ntfy://, json://, ...)
    channel: Literal["none", "webhook", "slack", "teams", "apprise"] = "none"
    url_env: str = "DETR_ALERT_URL"  # the environment variable holding the URL
    token_env: str | None = None  # webhook: a variable whose value is sent as a Bearer token
    on_failure: bool = True  # a stage failed, or the run was refused (another one held the lock)
    on_not_promoted: bool = True  # the new version stayed @challenger
    on_drift: bool = True  # the data drifted past register.drift's thresholds
    timeout_s: float = 10.0  # per notification; a receiver that fails is logged, not fatal

    def __post_init__(self) -> None:
        if self.channel not in ALERT_CHANNELS:
            raise ConfigError(f"alerts.channel: {self.channel!r} is not one of "
                              f"{', '.join(ALERT_CHANNELS)}")
        for key in ("url_env", "token_env"):
            value = getattr(self, key)
            if value is not None and not _ENV_NAME.fullmatch(value):
                raise ConfigError(f"alerts.{key}: {value[:40]!r} is not an environment variable "
                                  f"name; put the secret itself in the environment, not in "
                                  f"params.yaml")
        check_ranges("alerts", self, {"timeout_s": self.timeout_s > 0})


PIPELINE_SECTIONS: dict[str, type] = {"prepare": PrepareConfig, "validate": ValidateConfig,
                                      "evaluate": EvaluateConfig, "register": RegisterConfig,
                                      "schedule": ScheduleConfig, "alerts": AlertsConfig}


def load(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """All sections of ``path`` as their dataclasses (missing sections take defaults).

    ``validate.num_queries`` defaults to ``model.num_queries`` (None when that is ``auto``),
    ``validate.masks`` to whether ``model.task`` needs masks, ``register.model_name`` to
    :func:`model_name_for` ``prepare.source``.
    """
    data = read_params(path)
    out = parse_params(data, {**PIPELINE_SECTIONS, **LIBRARY_SECTIONS}, source=path,
                       other_sections=False)
    if out["register"].model_name is None:
        out["register"] = dataclasses.replace(
            out["register"], model_name=model_name_for(out["prepare"].source))
    if "num_queries" not in (data.get("validate") or {}):
        queries = out["model"].num_queries
        out["validate"] = dataclasses.replace(
            out["validate"], num_queries=None if queries == "auto" else queries)
    if "masks" not in (data.get("validate") or {}):
        out["validate"] = dataclasses.replace(out["validate"],
                                              masks=out["model"].task != "detection")
    return out
