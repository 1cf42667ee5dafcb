"""The ``train`` stage: :func:`detr.train.fit` with MLflow tracking.

Starts the pipeline's MLflow run (its id goes to ``reports/mlflow_run.json`` for evaluate and
register), logs every param, the losses and learning rates averaged over every
``train.log_every`` steps, per-epoch means, the val AP of each evaluation during training
(``train.eval_every_steps``), the dataset's DVC hash and the git commit. ``checkpoints/`` is a
persisted DVC output: an interrupted training resumes from ``checkpoint.pth``; evaluate and
register read ``best.pth``. The epoch history goes to ``plots/train_loss.csv``, the val AP
curve to ``plots/val_ap.csv`` (DVC plots). Settings left ``auto`` in params.yaml are resolved
from the dataset (:mod:`detr.settings`) and written with their rules to
``reports/settings.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from prefect import flow

from detr.checkpoint import CheckpointError
from detr.data.coco import AnnotationError, ImageLoadError
from detr.downloads import WeightsUnavailableError
from detr.engine import NonFiniteLossError
from detr.evaluation import STAT_NAMES
from detr.settings import resolve_configs
from detr.train import fit, with_init_weights
from pipelines import stage, tracking
from pipelines.stage import DATASET

CHECKPOINTS = Path("checkpoints")
LOSS_PLOT = Path("plots/train_loss.csv")
VAL_PLOT = Path("plots/val_ap.csv")
SETTINGS = Path("reports/settings.json")  # the resolved settings and their rules (DVC output)
VALIDATION = stage.VALIDATION_REPORT
DATASET_STATS = stage.DATASET_STATS
LIBRARY = ("model", "loss", "data", "train")


class MlflowLogger:
    """``fit`` callback: one batch of metrics (one round trip) per call. Step rows (the
    losses' means over ``train.log_every`` steps, an evaluation's ``val_*``) at their step;
    epoch rows (``epoch_*``) at the epoch, without the epoch's ``val_*`` copy (already
    logged at its step)."""

    def __init__(self, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id, self.pending = MlflowClient(), run_id, []

    def __call__(self, values: dict) -> None:
        now = _now_ms()
        if "step" in values:  # one optimiser step
            step = int(values["step"])
            self.pending += [Metric(k, float(v), now, step) for k, v in values.items()
                             if k not in ("step", "epoch")]
        else:  # end of an epoch
            epoch = int(values["epoch"])
            self.pending += [Metric(k, float(v), now, epoch) for k, v in values.items()
                             if k != "epoch" and not k.startswith("val_")]
        self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), 1000):  # MLflow's batch limit
            chunk = pending[i:i + 1000]
            tracking.retry(lambda c=chunk: self.client.log_batch(self.run_id, metrics=c),
                           what="log metrics")


def _now_ms() -> int:
    return int(time.time() * 1000)


def run(*, params: dict, dataset_dir: Path = DATASET, out_dir: Path = CHECKPOINTS,
        run_file: Path = tracking.RUN_FILE, plot_path: Path = LOSS_PLOT,
        val_plot_path: Path = VAL_PLOT, init_weights: Path | None = None, progress: bool = True,
        dataset_stats: Path = DATASET_STATS, validation_report: Path = VALIDATION,
        settings_path: Path = SETTINGS) -> Path:
    """Train (resuming from ``out_dir`` when possible); returns the best checkpoint's path
    (``best.pth``: the best val AP during training, else the last weights).

    ``auto`` settings are resolved from the dataset first (:mod:`detr.settings`): the table
    is printed, the resolved values are the run's params, and ``settings_path`` gets each
    value with its rule and the dataset profile (``reports/settings.json``, a DVC output).
    The validate stage's statistics (``dataset_stats``) and report go into the same MLflow
    run: metrics ``dataset.<split>.<name>``, artifact ``validation/validation.json``.
    """
    import mlflow

    params = {**params, "train": with_init_weights(params["train"], init_weights)}
    sections = _resolve(params, dataset_dir, settings_path)
    run_id = tracking.start_run(run_file=run_file)
    client = mlflow.MlflowClient()
    logged = tracking.flat_params(sections)
    items = list(logged.items())
    for i in range(0, len(items), 100):
        batch = [Param(k, v) for k, v in items[i:i + 100]]
        tracking.retry(lambda b=batch: client.log_batch(run_id, params=b), what="log params")
    md5 = tracking.dvc_hash(str(dataset_dir))
    if md5:
        tracking.retry(lambda: client.set_tag(run_id, "dataset_md5", md5), what="tag run")
    _log_dataset(client, run_id, dataset_stats, validation_report)
    tracking.retry(lambda: client.log_artifact(run_id, str(settings_path)),
                   what="log the resolved settings")
    logger = MlflowLogger(run_id)
    try:
        result = fit(model_cfg=sections["model"], loss_cfg=sections["loss"],
                     data_cfg=sections["data"], train_cfg=sections["train"], data_root=dataset_dir, out_dir=out_dir,
                     init_weights=init_weights, callback=logger, progress=progress,
                     evaluate_at_end=False)
    except BaseException as exc:  # the run must not stay RUNNING; the checkpoint stays
        if not isinstance(exc, tracking.TrackingUnavailableError):  # else MLflow is away
            _fail_run(client, run_id, logger,
                      "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        if isinstance(exc, NonFiniteLossError):
            raise SystemExit(f"train: {exc}") from None
        raise
    logger.flush()
    if result.start_epoch:
        tracking.retry(lambda: client.set_tag(run_id, "resumed_from_epoch",
                                              str(result.start_epoch)), what="tag run")
    _write_history(plot_path, result.history)
    _write_val_curve(val_plot_path, result.val_curve)
    return result.best


def _resolve(params: dict, dataset_dir: Path, path: Path) -> dict:
    """The library sections with ``auto`` resolved; the report written to ``path``."""
    from detr.device import device_type

    device = device_type(params["train"].device)
    try:
        model, data, train, res = resolve_configs(params["model"], params["data"],
                                                  params["train"], dataset_dir, device=device)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    print(res.table())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device, **res.to_json()}, indent=2) + "\n")
    return {**{k: params[k] for k in LIBRARY}, "model": model, "data": data, "train": train}


class SettingsError(ValueError):
    """An ``auto`` setting cannot be resolved from this dataset (the message names it)."""


def _fail_run(client, run_id: str, logger: MlflowLogger, status: str) -> None:
    """Best effort (the training error matters more, and MLflow may be what failed)."""
    try:
        logger.flush()
        client.set_terminated(run_id, status=status)
    except Exception as exc:
        print(f"train: could not mark MLflow run {run_id} {status}: {exc}", file=sys.stderr)


def _log_dataset(client, run_id: str, stats_path: Path, report_path: Path) -> None:
    if stats_path.is_file():
        now = _now_ms()
        flat = _flatten(json.loads(stats_path.read_text()), "dataset")
        metrics = [Metric(k, float(v), now, 0) for k, v in flat.items()]
        tracking.retry(lambda: client.log_batch(run_id, metrics=metrics),
                       what="log dataset statistics")
    if report_path.is_file():
        tracking.retry(lambda: client.log_artifact(run_id, str(report_path), "validation"),
                       what="log the validation report")


def _flatten(tree: dict, prefix: str) -> dict[str, float]:
    """Nested numbers -> ``{"prefix.a.b": value}``; names made safe for MLflow."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{re.sub(r'[^A-Za-z0-9_./ -]', '_', str(key))}"
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
    return out


def _write_history(path: Path, history: list[dict]) -> None:
    """Epoch rows (``epoch``, ``loss``, each loss term, ``val_AP``...) as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["epoch"] + sorted({k.removeprefix("epoch_") for row in history for k in row
                                  if k != "epoch"})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k.removeprefix("epoch_"): v for k, v in row.items()})


def _write_val_curve(path: Path, curve: list[dict]) -> None:
    """One row per evaluation during training: ``step``, ``epoch``, the COCO statistics
    (header only when none ran, so that the DVC plot output always exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["step", "epoch", *STAT_NAMES]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(curve)


@flow(name="train", log_prints=True)
def train_flow(**kwargs) -> Path:
    return run(**kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines train``: 0 trained, 1 NaN/inf loss (``SystemExit`` with the step
    and the term), 2 unusable params, dataset or init weights (the message names the file)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines train")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=DATASET)
    parser.add_argument("--out", type=Path, default=CHECKPOINTS)
    parser.add_argument("--init-weights", type=Path, default=None,
                        help="fine-tune from this checkpoint (official DETR or own)")
    args = parser.parse_args(argv)
    from pipelines.params import load

    params = load(args.params)
    try:
        checkpoint = stage.invoke(train_flow, run, params=params, dataset_dir=args.data,
                                  out_dir=args.out, init_weights=args.init_weights,
                                  progress=sys.stderr.isatty())
    except (CheckpointError, AnnotationError, ImageLoadError, FileNotFoundError,
            SettingsError, WeightsUnavailableError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    print(f"train: best checkpoint {checkpoint}")
    return 0
