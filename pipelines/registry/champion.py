"""The champion, measured again on today's val split, cached.

:func:`measure_champion` downloads the champion version's checkpoint artifact (the slim
checkpoint :mod:`pipelines.mlflow_model` logs) and evaluates it with
:func:`pipelines.measurement.measure`, the evaluate stage's code and settings. The result is
cached in ``cache_dir/<model>-v<version>-<dataset md5>-<settings>.json`` (the dataset's DVC
hash from dvc.lock; ``settings``: a digest of the val resizing, the precision and
``evaluate.tile``, which change the numbers), so registering again on the same data costs nothing; without a known dataset hash
nothing is cached.

Cache file / result: ``{"model_name", "version", "dataset_md5", "stats": {name: float},
"per_class": {class: AP or null}, "evaluated_at", "cached": bool}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from detr.config import DataConfig, TrainConfig
from pipelines import tracking
from pipelines.measurement import measure, per_class_ap, with_tile
from pipelines.mlflow_model import CHECKPOINT_FILE
from pipelines.params import EvaluateConfig
from pipelines.reporting.segmentation import evaluate_segmentation, segmentation_stats

CACHE_DIR = Path("reports/champion_eval")
_UNSAFE = re.compile(r"[^\w.\-]")


def cache_path(cache_dir: Path, name: str, version: int, dataset_md5: str, *,
               data_cfg: DataConfig, train_cfg: TrainConfig,
               cfg: EvaluateConfig | None = None) -> Path:
    """Where the measurement of ``name`` version ``version`` on dataset ``dataset_md5`` goes."""
    # The val resize is the version's own (its checkpoint's params); data_cfg's only counts
    # for a checkpoint without one.
    scales = data_cfg.scales if isinstance(data_cfg.scales, str) else list(data_cfg.scales)
    values = [scales, data_cfg.max_size, train_cfg.precision]
    if cfg is not None and cfg.tile is not None:  # untiled: the digest it always had
        values.append(dataclasses.asdict(cfg.tile))
    if cfg is not None and cfg.nms is not None:  # without NMS: the digest it always had
        values.append({"nms": cfg.nms})
    settings = json.dumps(values)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:8]
    return Path(cache_dir) / (_UNSAFE.sub("_", f"{name}-v{version}-{dataset_md5}-{digest}")
                              + ".json")


def measure_champion(name: str, version: int, *, dataset_dir: Path, dataset_md5: str | None,
                     cfg: EvaluateConfig, data_cfg: DataConfig, train_cfg: TrainConfig,
                     cache_dir: Path = CACHE_DIR) -> dict[str, Any]:
    """The champion's statistics and per-class AP on ``dataset_dir``'s val split (module doc).

    Raises:
        FileNotFoundError: no val split under ``dataset_dir``.
        CheckpointError, EvaluationInputError: the version's checkpoint is unusable, or was
            trained on other categories than the val split's.
        mlflow.exceptions.MlflowException: the artifact could not be downloaded.
    """
    cfg = with_tile(cfg, dataset_dir)
    path = cache_path(cache_dir, name, version, dataset_md5, data_cfg=data_cfg,
                      train_cfg=train_cfg, cfg=cfg) if dataset_md5 else None
    if path is not None and path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    with tempfile.TemporaryDirectory(prefix="detr-champion-") as tmp:
        checkpoint = tracking.retry(lambda: _download(name, version, Path(tmp)),
                                    what=f"download {name} version {version}")
        measured = measure(checkpoint, dataset_dir, cfg=cfg, data_cfg=data_cfg,
                           train_cfg=train_cfg)
    evaluation = measured.evaluation
    stats = {**evaluation.stats, **segmentation_stats(
        evaluate_segmentation(measured.predictions, measured.val.coco))}
    result = {"model_name": name, "version": int(version), "dataset_md5": dataset_md5,
              "stats": stats, "per_class": per_class_ap(evaluation),
              "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds")}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "cached": False}


def _download(name: str, version: int, dst: Path) -> Path:
    import mlflow

    uri = f"models:/{name}/{version}/artifacts/{CHECKPOINT_FILE}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
