"""The registered model: a trained DETR as an MLflow pyfunc (images in, detections out).

Contract of :class:`DetrPyfunc` (also the model signature, see :func:`model_signature`):

- input: a pandas DataFrame with a string column ``image``: one base64-encoded image file
  (JPEG, PNG, anything Pillow reads; a ``data:image/...;base64,`` prefix is accepted) per row.
- params (optional): ``score_threshold`` (float in [0, 1], default from ``inference.json``) and
  ``top_k`` (int >= 1, the most detections kept per image); tiled prediction for large images
  with small objects (``python -m detr.predict --tile``'s options, :mod:`detr.data.tiling`):
  ``tile`` (string: ``""`` = off, the default; ``"auto"`` = the val scale; or pixels such as
  ``"512"``), ``overlap`` (0.2), ``tile_whole`` (false), ``merge`` (``"ios"`` or ``"iou"``),
  ``merge_threshold`` (0.5), ``fuse`` (false).
- output: a DataFrame with one row per input row and a string column ``detections``: a JSON
  list, best score first, of ``{"box": [x1, y1, x2, y2], "score": float, "category_id": int,
  "category": str}``; boxes in absolute pixels of the original image, clipped to it. A
  segmentation model (its checkpoint has the mask head, ``mask_head.*`` weights) adds a string
  column ``masks``: a JSON list parallel to ``detections`` (item i = detection i) of COCO RLEs
  ``{"size": [height, width], "counts": str}`` at the original image's size
  (``pycocotools.mask.decode`` reads them); the signature then lists both columns.

Artifacts logged with the model: ``checkpoint`` (the training checkpoint without its optimiser
state: ``model``, ``params``, ``label_map``, ``epoch``) and ``inference`` (``inference.json``:
``{"short_side", "max_size", "score_threshold", "top_k"}``, the val preset's scale).

The model is logged as code (MLflow's "models from code"): a three-line file that imports
:class:`DetrPyfunc`; MLflow 3.17 refuses to unpickle a pickled ``PythonModel`` by default.
The ``detr`` and ``pipelines`` packages (``pip install -e .``) must be importable where the
model is loaded, so serve it from the project environment::

    mlflow models serve -m models:/detr@champion --env-manager local
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import tempfile
import warnings
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.pyfunc import PythonModel
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from detr.checkpoint import load_file, save_file
from detr.config import DataConfig
from detr.data.tiling import TileOptions
from detr.hub import model_from_checkpoint, val_resize
from detr.inference import Predictor, check_options

CHECKPOINT_ARTIFACT = "checkpoint"
INFERENCE_ARTIFACT = "inference"
CHECKPOINT_FILE = "checkpoint.pth"  # the checkpoint artifact's file name in the model
DEFAULT_TOP_K = 100
BATCH_SIZE = 8  # images (or tiles of one image) per forward pass in predict()
# The tiling params of predict() and their defaults (tile "": off); types as in the signature.
TILE_PARAMS: dict[str, Any] = {"tile": "", "overlap": 0.2, "tile_whole": False, "merge": "ios",
                               "merge_threshold": 0.5, "fuse": False}
# What the model imports at load time; pinned to the installed versions (local labels such as
# "+cu130" dropped). The project itself (detr-ops) is not on PyPI: serve with --env-manager local.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow", "scipy")
MODEL_CODE = (
    '"""DETR pyfunc, logged as code: see pipelines/mlflow_model.py."""\n'
    "from mlflow.models import set_model\n\n"
    "from pipelines.mlflow_model import DetrPyfunc\n\n"
    "set_model(DetrPyfunc())\n"
)


def inference_settings(resize: tuple[int, int], *, score_threshold: float = 0.5,
                       top_k: int = DEFAULT_TOP_K, nms: float | None = None) -> dict[str, Any]:
    """``inference.json``: the val resize ``(short side, long side cap)`` the model was
    trained for, the default ``score_threshold`` and ``top_k`` of predict(), and ``nms``
    (the evaluate stage's class-wise NMS IoU, None = off: served as it was measured)."""
    check_options(score_threshold, top_k)
    return {"short_side": int(resize[0]), "max_size": int(resize[1]),
            "score_threshold": float(score_threshold), "top_k": int(top_k),
            "nms": None if nms is None else float(nms)}


def model_signature(*, score_threshold: float = 0.5, top_k: int = DEFAULT_TOP_K,
                    masks: bool = False):
    """``image`` (string) -> ``detections`` (string) (and ``masks`` (string) with ``masks``:
    a segmentation model), params ``score_threshold`` (double) and ``top_k`` (long) with the
    given defaults, and :data:`TILE_PARAMS`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    kinds = {str: DataType.string, float: DataType.double, bool: DataType.boolean}
    tiling = [ParamSpec(name, kinds[type(value)], value) for name, value in TILE_PARAMS.items()]
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "image")]),
        outputs=Schema([ColSpec(DataType.string, name)
                        for name in ("detections", "masks")[:2 if masks else 1]]),
        params=ParamSchema([ParamSpec("score_threshold", DataType.double, float(score_threshold)),
                            ParamSpec("top_k", DataType.long, int(top_k)), *tiling]),
    )


def pip_requirements() -> list[str]:
    """``name==version`` of :data:`REQUIREMENTS` as installed here (no environment inference)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def has_mask_weights(ckpt: dict) -> bool:
    """Whether a checkpoint's ``model`` weights include a mask head (``mask_head.*``, the
    official segmentation key prefix)."""
    return any(str(key).startswith("mask_head.") for key in ckpt.get("model", {}))


def slim_checkpoint(source: Path, target: Path, ckpt: dict | None = None) -> Path:
    """Copy a training checkpoint to ``target`` without the resume-only entries (optimiser,
    scheduler, rng, history): about a third of the size, same weights and params.

    ``ckpt``: the checkpoint already read from ``source`` (it is then not read again).
    Raises CheckpointError (naming ``source``) when it is not a usable training checkpoint.
    """
    ckpt = load_file(source) if ckpt is None else ckpt
    model_from_checkpoint(source, ckpt=ckpt)  # fail fast, before anything is uploaded
    keep = {k: ckpt[k] for k in ("model", "params", "label_map", "epoch") if k in ckpt}
    save_file(keep, target)
    return target


def log_model(checkpoint: Path, data_cfg: DataConfig, *, name: str = "model",
              score_threshold: float = 0.5, top_k: int = DEFAULT_TOP_K,
              nms: float | None = None):
    """Log ``checkpoint`` as a :class:`DetrPyfunc` in the active MLflow run.

    Returns MLflow's ``ModelInfo``; its ``model_uri`` is ``models:/m-<id>`` (a LoggedModel),
    the URI to register. Raises CheckpointError when ``checkpoint`` is not a training
    checkpoint (checked here, before anything is uploaded).
    """
    import mlflow

    ckpt = load_file(checkpoint)  # read once: the resize here, the weights below
    resize = val_resize(ckpt, checkpoint, data_cfg)
    settings = inference_settings(resize, score_threshold=score_threshold, top_k=top_k,
                                  nms=nms)
    with tempfile.TemporaryDirectory(prefix="detr-pyfunc-") as tmp:
        tmp = Path(tmp)
        weights = slim_checkpoint(Path(checkpoint), tmp / CHECKPOINT_FILE, ckpt)
        (tmp / "inference.json").write_text(json.dumps(settings, indent=2) + "\n")
        (tmp / "detr_model.py").write_text(MODEL_CODE)
        with warnings.catch_warnings():  # no input example on purpose: a base64 image
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(tmp / "detr_model.py"),
                artifacts={CHECKPOINT_ARTIFACT: str(weights),
                           INFERENCE_ARTIFACT: str(tmp / "inference.json")},
                signature=model_signature(score_threshold=score_threshold, top_k=top_k,
                                          masks=has_mask_weights(ckpt)),
                pip_requirements=pip_requirements(),
            )


class DetrPyfunc(PythonModel):
    """DETR behind MLflow's pyfunc interface (contract: module docstring)."""

    def load_context(self, context) -> None:
        """A :class:`detr.inference.Predictor` from the ``checkpoint`` artifact, with the
        resize and defaults of ``inference.json``."""
        settings = json.loads(Path(context.artifacts[INFERENCE_ARTIFACT]).read_text())
        self.defaults = {"score_threshold": float(settings["score_threshold"]),
                         "top_k": int(settings["top_k"])}
        self.predictor = Predictor.from_checkpoint(
            context.artifacts[CHECKPOINT_ARTIFACT], scale=int(settings["short_side"]),
            max_size=int(settings["max_size"]), nms=settings.get("nms"), **self.defaults)

    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Detect objects in each row's ``image``; see the module docstring for the contract.

        Raises:
            ValueError: no ``image`` column, a row that is not a base64 image (named by its
                position), or params out of range.
        """
        threshold, top_k = self._options(params)
        tile = self._tile(params)
        texts = _image_column(model_input)
        rows: list[str] = []
        masks: list[str] = []
        for start in range(0, len(texts), BATCH_SIZE):
            images = [decode_image(text, row=start + i)
                      for i, text in enumerate(texts[start:start + BATCH_SIZE])]
            for det in self.predictor.predict(images, score_threshold=threshold, top_k=top_k,
                                              batch_size=BATCH_SIZE, tile=tile):
                rows.append(replace(det, masks=None).to_json())
                masks.append(json.dumps(det.rles()))
        frame = {"detections": pd.Series(rows, dtype=object)}
        if self.predictor.has_masks:
            frame["masks"] = pd.Series(masks, dtype=object)
        return pd.DataFrame(frame)

    def _options(self, params: dict[str, Any] | None) -> tuple[float, int]:
        params = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        threshold, top_k = float(params["score_threshold"]), int(params["top_k"])
        check_options(threshold, top_k)
        return threshold, top_k

    def _tile(self, params: dict[str, Any] | None) -> TileOptions | None:
        """The tiling params (:data:`TILE_PARAMS`) as options; None when ``tile`` is off."""
        given = {k: v for k, v in (params or {}).items() if k in TILE_PARAMS and v is not None}
        values = {**TILE_PARAMS, **given}
        size = str(values["tile"]).strip()
        if size in ("", "0", "off", "none"):
            return None
        if size != "auto" and not size.isdigit():
            raise ValueError(f"params: tile {size!r} is not a number of pixels, 'auto' or ''")
        try:
            return self.predictor.tiling(size, overlap=float(values["overlap"]),
                                         whole=bool(values["tile_whole"]), match=values["merge"],
                                         threshold=float(values["merge_threshold"]),
                                         fuse=bool(values["fuse"]))
        except ValueError as exc:  # TileOptions names its fields: say which params they are
            raise ValueError(f"params: {exc} (params tile, overlap, merge = match, "
                             f"merge_threshold = threshold)") from exc


def decode_image(text: str, *, row: int = 0) -> Tensor:
    """A base64 image file -> uint8 RGB tensor [3, H, W]; ValueError names ``row``."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"row {row}: 'image' must be a non-empty base64 string, "
                         f"got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(raw)) as pil:
            rgb = pil.convert("RGB")
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"row {row}: 'image' is not valid base64: {exc}") from exc
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"row {row}: 'image' is not a readable image file: {exc}") from exc
    return F.pil_to_tensor(rgb)


def encode_image(path: str | Path) -> str:
    """The base64 text of an image file, as :class:`DetrPyfunc` expects in ``image``."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _image_column(frame: Any) -> list:
    if not isinstance(frame, pd.DataFrame) or "image" not in frame.columns:
        found = list(frame.columns) if isinstance(frame, pd.DataFrame) else type(frame).__name__
        raise ValueError(f"DetrPyfunc.predict: expected a DataFrame with an 'image' column "
                         f"(base64 image files), got {found}")
    return frame["image"].tolist()
