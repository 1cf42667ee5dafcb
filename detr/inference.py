"""Inference: weights in, detections out, for images of any size.

:class:`Predictor` wraps a DETR model with the val preprocessing of its training (short side
resized to ``scale``, long side <= ``max_size``, ImageNet normalisation) and turns its outputs
into :class:`Detections`: absolute xyxy pixels of the *original* image, scores, category ids and
names, best score first, after a score threshold and top-k.

Large images with small objects: ``predict(..., tile=TileOptions(size, overlap))`` cuts each
image into overlapping tiles (:func:`detr.data.tiling.tile_grid`), predicts them in batches,
maps their boxes back to the image and merges the duplicates of the overlaps
(:func:`detr.data.tiling.merge`); the detections keep the same contract. :meth:`Predictor.
tiling` builds the options, ``size="auto"`` being the model's val scale (each tile is then
seen at its own resolution).

Segmentation models (their forward adds ``pred_masks``, :mod:`detr.masks_out`): each
:class:`Detections` also has ``masks``, bool [N, H, W] at the original image size (row i =
detection i; NMS drops the masks of the boxes it drops), and with ``predict(...,
panoptic=True)`` a panoptic map; its ``to_coco`` / ``to_records`` / ``to_json`` carry COCO RLE
``segmentation``. Tiled prediction of masks is refused (``tile=``: a ValueError naming it):
predict such images whole.

Inputs (mixed in one call): a path to an image file, a ``PIL.Image`` or a ``[3, H, W]`` tensor
(uint8, or float in [0, 1]). Pixels are used as stored: no EXIF rotation, as in COCO and in
:class:`detr.data.coco.CocoDetection`, so boxes refer to the pixel grid of the file.

A registered MLflow model (``models:/<name>@champion``) is not loaded here: :mod:`detr` never
imports mlflow. On the pipelines side, ``mlflow.pyfunc.load_model("models:/<name>@champion")``
loads it; its pyfunc builds a Predictor from the logged checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.ops import clip_boxes_to_image

from detr import hub
from detr.attention import QueryAttention, top_query_attention
from detr.checkpoint import CheckpointError, load_file
from detr.data.coco import category_ids_from_label_map
from detr.data.tiling import TileOptions, predict_tiles
from detr.data.transforms import make_transforms
from detr.detections import Detections  # noqa: F401  (public here too)
from detr.device import autocast, resolve_precision, select_device
from detr.duplicates import class_wise_nms
from detr.images import ImageInput, as_list, load_image  # noqa: F401  (public here too)
from detr.masks_out import has_mask_head, masks_for, panoptic_for
from detr.models.backbone import fold_batchnorm
from detr.models.postprocess import PostProcess

# COCO 2017 category names by id; ids 1..90 with 80 in use (the official DETR class head).
_COCO_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
    7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
    13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog",
    19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra",
    25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite",
    39: "baseball bat", 40: "baseball glove", 41: "skateboard", 42: "surfboard",
    43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife",
    50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange",
    56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake",
    62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone",
    78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier",
    90: "toothbrush",
}
# Name of each label of the official checkpoints (label = category id); "N/A" for unused ids.
COCO_CATEGORY_NAMES: tuple[str, ...] = tuple(
    _COCO_NAMES.get(i, "N/A") for i in range(hub.COCO_NUM_CLASSES))

_OFFICIAL_ENTRIES = {
    ("resnet50", False): hub.detr_resnet50, ("resnet50", True): hub.detr_resnet50_dc5,
    ("resnet101", False): hub.detr_resnet101, ("resnet101", True): hub.detr_resnet101_dc5,
}


class Predictor:
    """A DETR model with its preprocessing and postprocessing: images -> :class:`Detections`.

    Args:
        model: a DETR (moved to ``device`` and put in eval mode). Its outputs follow the model
            contract: ``pred_logits`` [B, Q, C + 1], ``pred_boxes`` [B, Q, 4] normalised cxcywh.
        category_ids: category id of each label ``0..C-1`` (None: the labels are the ids, as in
            the official COCO checkpoints).
        category_names: name of each label, parallel to the labels (None: the id as text).
        scale, max_size: val resize: short side to ``scale``, long side at most ``max_size``.
        device: ``auto`` (CUDA if present), ``cpu``, ``cuda:1`` ...
        precision: ``auto`` is fp32 on every device; ``bf16`` autocasts where supported. At
            prediction's batch sizes bf16 autocast was slower than fp32 on H100 and H200 GPUs
            (R50, batch 2: 1.01x vs 1.35x the official code's speed; docs/speed.md), and
            most CPUs emulate it.
        score_threshold, top_k: defaults of :meth:`predict`.
        nms: IoU of a class-wise NMS on each image's (or tile's) detections, or None (off):
            DETR promises one box per query and object, but an under-trained model draws
            second boxes on objects (the evaluate stage counts them; ``evaluate.nms``).
        fold_bn: run :meth:`predict` on a copy of the model with each BatchNorm folded into the
            convolution before it (:func:`detr.models.backbone.fold_batchnorm`): the same
            outputs up to float rounding, fewer kernels. ``model`` keeps its weights and keys;
            the copy is made here, so build a new Predictor after changing the model's weights.
        channels_last: run :meth:`predict` with 4-D weights in the channels-last memory layout
            (faster convolutions on GPUs and recent CPUs; the numbers are the same). Weights the
            copy shares with ``model`` change layout, not values.
        stuff_ids: category ids of the stuff classes (``isthing`` 0), for panoptic maps of a
            segmentation model; the others are things.

    Raises:
        ValueError: categories that do not match the model's number of classes, bad sizes or
            options, or an unavailable device or precision.
    """

    def __init__(self, model: nn.Module, *, category_ids: Sequence[int] | None = None,
                 category_names: Sequence[str] | None = None, scale: int, max_size: int,
                 device: str = "auto", precision: str = "auto", score_threshold: float = 0.5,
                 top_k: int = 100, fold_bn: bool = True, channels_last: bool = True,
                 nms: float | None = None, stuff_ids: Iterable[int] = ()) -> None:
        check_options(score_threshold, top_k)
        if nms is not None and not 0 < nms <= 1:
            raise ValueError(f"nms: {nms!r} must be an IoU in (0, 1], or None (off)")
        self.nms = None if nms is None else float(nms)
        ids, names = _categories(model, category_ids, category_names)
        self.device = select_device(device)
        self.precision = _inference_precision(precision, self.device)
        self.model = model.eval().to(self.device)
        net = fold_batchnorm(self.model) if fold_bn else self.model
        self._net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.postprocess = PostProcess(ids).to(self.device)
        self._ids = list(ids)
        self.category_names: dict[int, str] = dict(zip(ids, names, strict=True))
        self.scale, self.max_size = int(scale), int(max_size)
        self.transform = make_transforms("val", scales=(self.scale,), max_size=self.max_size)
        self.score_threshold, self.top_k = float(score_threshold), int(top_k)
        self.stuff_ids = frozenset(int(c) for c in stuff_ids)

    @property
    def has_masks(self) -> bool:
        """Whether the model is a segmentation DETR (:func:`detr.masks_out.has_mask_head`)."""
        return has_mask_head(self.model)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "auto", precision: str = "auto",
                        score_threshold: float = 0.5, top_k: int = 100, scale: int | None = None,
                        max_size: int | None = None, nms: float | None = None) -> Predictor:
        """A training checkpoint of this project (``model``, ``params``, ``label_map``).

        ``scale`` and ``max_size`` default to the checkpoint's val preset: ``max(scales)`` and
        ``max_size`` of ``params["data"]``. The label map's categories with ``isthing`` 0 are
        the stuff classes. Raises CheckpointError naming ``path``.
        """
        ckpt = load_file(path)
        model, _, label_map = hub.model_from_checkpoint(path, ckpt=ckpt)
        if scale is None or max_size is None:
            trained = hub.val_resize(ckpt, path)
            scale = trained[0] if scale is None else scale
            max_size = trained[1] if max_size is None else max_size
        ids, names = _label_map_categories(label_map, path)
        stuff = [c.get("id") for c in (label_map or {}).get("categories", [])
                 if isinstance(c, dict) and c.get("isthing", 1) == 0]
        return cls(model, category_ids=ids, category_names=names, scale=scale,
                   max_size=max_size, device=device, precision=precision,
                   score_threshold=score_threshold, top_k=top_k, nms=nms, stuff_ids=stuff)

    @classmethod
    def from_official(cls, pretrained: bool | str | Path = True, *, backbone: str = "resnet50",
                      dilation: bool = False, device: str = "auto", precision: str = "auto",
                      score_threshold: float = 0.5, top_k: int = 100, scale: int = 800,
                      max_size: int = 1333, nms: float | None = None,
                      model_overrides: Mapping[str, object] | None = None) -> Predictor:
        """An official DETR COCO model: ``pretrained=True`` downloads the release's weights
        (hash-checked), a path or URL reads an official-format file (``{"model": state}``).

        Labels are COCO category ids, named by :data:`COCO_CATEGORY_NAMES`. ``model_overrides``
        go to the :mod:`detr.hub` entry point (e.g. a small architecture in tests).

        Raises:
            ValueError: an unknown ``backbone`` / ``dilation`` pair.
            CheckpointError: the file is missing or does not fit the architecture.
        """
        entry = _OFFICIAL_ENTRIES.get((backbone, bool(dilation)))
        if entry is None:
            known = sorted({b for b, _ in _OFFICIAL_ENTRIES})
            raise ValueError(f"from_official: no official DETR with backbone {backbone!r} "
                             f"(known: {', '.join(known)}; dilation True or False)")
        model = entry(pretrained=pretrained, **dict(model_overrides or {}))
        return cls(model, category_ids=None, category_names=COCO_CATEGORY_NAMES, scale=scale,
                   max_size=max_size, device=device, precision=precision,
                   score_threshold=score_threshold, top_k=top_k, nms=nms)

    def predict(self, images: ImageInput | Iterable[ImageInput], *,
                score_threshold: float | None = None, top_k: int | None = None,
                batch_size: int = 8, tile: TileOptions | None = None,
                panoptic: bool = False) -> list[Detections]:
        """Detect objects; one :class:`Detections` per image, in input order.

        ``images``: one image or a sequence (paths, PIL images, [3, H, W] tensors, mixed; a
        [B, 3, H, W] tensor is B images). They are read and run ``batch_size`` at a time,
        padded to a common size (the model masks the padding). ``score_threshold`` keeps
        scores >= it; ``top_k`` keeps at most that many; None = the predictor's defaults.
        ``tile``: predict each image larger than ``tile.size`` tile by tile, ``batch_size``
        tiles at a time, and merge (module doc); an image that fits in one tile is predicted
        as without tiling; refused for a segmentation model (module doc). ``panoptic``: add
        each image's panoptic map (segmentation models only).

        Raises:
            ImageLoadError: an image file is missing or unreadable (the message names it).
            ValueError: an input of another type or shape (named by its position), or bad
                options.
        """
        threshold = self.score_threshold if score_threshold is None else float(score_threshold)
        top_k = self.top_k if top_k is None else int(top_k)
        check_options(threshold, top_k)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._check_mask_options(tile, panoptic)
        items = as_list(images)
        if tile is not None:
            return [self._detect_tiled(load_image(item, index=i), tile, threshold, top_k,
                                       batch_size) for i, item in enumerate(items)]
        results: list[Detections] = []
        for start in range(0, len(items), batch_size):
            pixels = [load_image(item, index=start + i)
                      for i, item in enumerate(items[start:start + batch_size])]
            results.extend(self._detect(pixels, threshold, top_k, panoptic))
        return results

    def _check_mask_options(self, tile: TileOptions | None, panoptic: bool) -> None:
        if tile is not None and self.has_masks:
            raise ValueError("tile: tiled prediction does not support a segmentation model's "
                             "masks; predict whole images (leave tile None; CLI: drop --tile)")
        if panoptic and not self.has_masks:
            raise ValueError(f"panoptic=True needs a segmentation model (one with a mask head "
                             f"that outputs pred_masks); {type(self.model).__name__} has none")

    def _detect(self, pixels: list[Tensor], threshold: float, top_k: int,
                panoptic: bool = False) -> list[Detections]:
        """[3, H, W] images -> their detections (one forward pass), with masks (and panoptic
        maps when asked) for a segmentation model."""
        found, outputs, sizes = self._forward(pixels)
        orig = [list(p.shape[-2:]) for p in pixels]
        if "pred_masks" not in outputs:
            return [self._select(det, size, threshold, top_k)
                    for det, size in zip(found, orig, strict=True)]
        keep = [det["query"][self._order(det, threshold, top_k).to(det["query"].device)]
                for det in found]
        chosen = [self._select(det, size, threshold, top_k)
                  for det, size in zip(found, orig, strict=True)]
        masks = masks_for(outputs, keep, sizes, orig)
        maps = (panoptic_for(outputs, sizes, orig, threshold=threshold,
                             stuff_ids=self.stuff_ids, label_to_category=self._ids)
                if panoptic else [None] * len(chosen))
        return [dataclasses.replace(det, masks=m.cpu(), panoptic=p)
                for det, m, p in zip(chosen, masks, maps, strict=True)]

    def _raw(self, pixels: list[Tensor]) -> list[dict[str, Tensor]]:
        """[3, H, W] images -> every query's ``boxes`` (xyxy pixels of each image),
        ``scores``, ``labels`` (category ids), on the predictor's device."""
        return self._forward(pixels)[0]

    @torch.inference_mode()
    def _forward(self, pixels: list[Tensor]) -> tuple[list[dict[str, Tensor]], dict,
                                                      list[list[int]]]:
        """:meth:`_raw`'s detections (plus ``query``, each one's query index, when the model
        gives ``pred_masks``), the model's outputs and each image's input (resized) size."""
        sizes = torch.tensor([list(p.shape[-2:]) for p in pixels], device=self.device)
        batch = [self.preprocess(p).to(self.device) for p in pixels]
        with autocast(self.device, self.precision):
            outputs = self._net(batch)
        found = self.postprocess(outputs, sizes)
        if "pred_masks" in outputs:
            queries = torch.arange(outputs["pred_masks"].shape[1], device=self.device)
            found = [{**det, "query": queries} for det in found]
        if self.nms is not None:
            found = [class_wise_nms(d, self.nms) for d in found]
        return found, outputs, [list(b.shape[-2:]) for b in batch]

    def _detect_tiled(self, pixels: Tensor, tile: TileOptions, threshold: float, top_k: int,
                      batch_size: int) -> Detections:
        """One image predicted tile by tile (plus whole with ``tile.whole``), merged."""
        found = predict_tiles(self._raw, pixels, tile, score_threshold=threshold,
                              batch_size=batch_size, limit=top_k)
        return self._select(found, list(pixels.shape[-2:]), threshold, top_k)

    def tiling(self, size: int | str = "auto", **options) -> TileOptions:
        """:class:`TileOptions` for :meth:`predict`; ``size="auto"``: the val scale (short
        side ``scale``, at most ``max_size``), so that a tile is not resized. ``options``:
        ``overlap``, ``whole``, ``match``, ``threshold``, ``fuse``."""
        if size == "auto":
            size = min(self.scale, self.max_size)
        elif isinstance(size, str):
            size = int(size) if size.isdigit() else size
        return TileOptions(size=size, **options)

    def attention(self, image: ImageInput, *, top_k: int = 6) -> list[QueryAttention]:
        """The ``top_k`` best-scoring detections of one image (no score threshold) and where
        each one's object query looked: :func:`detr.attention.top_query_attention`, boxes and
        heat maps in the original image's pixels. Draw them with
        :func:`detr.visualize.attention_figure`. A segmentation model: its detector's
        (``model.detr``, the box model it wraps) queries."""
        pixels = load_image(image)
        detector = self.model.detr if self.has_masks else self.model
        with autocast(self.device, self.precision):
            return top_query_attention(detector, self.preprocess(pixels).to(self.device),
                                       postprocess=self.postprocess,
                                       orig_size=tuple(pixels.shape[-2:]), top_k=top_k)

    def preprocess(self, image: Tensor) -> Tensor:
        """uint8 or float [3, H, W] -> float32 [3, H', W']: the val preset of
        :func:`detr.data.transforms.make_transforms` (resize, ImageNet normalisation)."""
        height, width = image.shape[-2:]
        empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros((0, 4)), format="XYXY",
                                                   canvas_size=(height, width)),
                 "labels": torch.zeros((0,), dtype=torch.int64)}
        out, _ = self.transform(tv_tensors.Image(image), empty)
        return out

    def _select(self, det: dict[str, Tensor], size: list[int], threshold: float,
                top_k: int) -> Detections:
        """Scores >= threshold, best first, at most top_k; boxes clipped to the image."""
        scores = det["scores"].float().cpu()
        order = self._order(det, threshold, top_k)
        height, width = size
        boxes = clip_boxes_to_image(det["boxes"].float().cpu()[order], (height, width))
        labels = det["labels"].cpu()[order].to(torch.int64)
        names = [self.category_names.get(c, str(c)) for c in labels.tolist()]
        return Detections(boxes, scores[order], labels, names, (height, width))

    @staticmethod
    def _order(det: dict[str, Tensor], threshold: float, top_k: int) -> Tensor:
        """Indices (CPU) of the detections kept: scores >= threshold, best first, top_k."""
        scores = det["scores"].float().cpu()
        order = scores.argsort(descending=True, stable=True)
        return order[scores[order] >= threshold][:top_k]


def _categories(model: nn.Module, ids: Sequence[int] | None,
                names: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """Category id and name of each label, checked against ``model.num_classes``."""
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int):
        raise ValueError(f"Predictor: the model ({type(model).__name__}) has no int "
                         f"'num_classes'; expected a DETR")
    ids = list(range(num_classes)) if ids is None else [int(i) for i in ids]
    names = [str(i) for i in ids] if names is None else [str(n) for n in names]
    if len(ids) != num_classes or len(names) != num_classes:
        raise ValueError(f"Predictor: the model has {num_classes} classes but got "
                         f"{len(ids)} category ids and {len(names)} names")
    return ids, names


def _label_map_categories(label_map: dict | None,
                          path: str | Path) -> tuple[list[int] | None, list[str] | None]:
    """(ids, names) of a checkpoint's label map; (None, None) when it has none."""
    if label_map is None:
        return None, None
    try:
        ids = category_ids_from_label_map(label_map)
        names = [str(c["name"]) for c in label_map["categories"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad label_map: {exc}") from exc
    return ids, names


def _inference_precision(precision: str, device: torch.device) -> str:
    """Like :func:`detr.device.resolve_precision`, but ``auto`` is fp32 everywhere (measured
    faster than bf16 autocast for inference at small batches, GPUs included)."""
    if precision == "auto":
        return "fp32"
    return resolve_precision(precision, device)


def check_options(score_threshold: float, top_k: int) -> None:
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
