"""The ``train`` stage: :func:`detr.train.fit` with MLflow tracking.

Starts the pipeline's MLflow run (its id goes to ``reports/mlflow_run.json`` for evaluate and
register), logs every param, per-step losses and learning rates, per-epoch means (and val AP
when ``train.eval_every`` is set), the dataset's DVC hash and the git commit. ``checkpoints/``
is a persisted DVC output: an interrupted training resumes from its last epoch. The epoch
history goes to ``plots/train_loss.csv`` (a DVC plot).
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
from detr.engine import NonFiniteLossError
from detr.train import fit
from pipelines import stage, tracking
from pipelines.stage import DATASET

CHECKPOINTS = Path("checkpoints")
LOSS_PLOT = Path("plots/train_loss.csv")
VALIDATION = Path("reports/validation/validation.json")  # written by the validate stage
DATASET_STATS = VALIDATION.parent / "dataset.json"  # its statistics, beside the report
LOG_EVERY = 20  # steps per batch of MLflow metrics (one round trip each)
LIBRARY = ("model", "loss", "data", "train")


class MlflowLogger:
    """``fit`` callback: per-step metrics in batches, per-epoch metrics at once."""

    def __init__(self, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id, self.pending = MlflowClient(), run_id, []

    def __call__(self, values: dict) -> None:
        now = _now_ms()
        if "step" in values:  # one optimiser step
            step = int(values["step"])
            self.pending += [Metric(k, float(v), now, step) for k, v in values.items()
                             if k not in ("step", "epoch")]
            if step % LOG_EVERY == 0:
                self.flush()
        else:  # end of an epoch
            epoch = int(values["epoch"])
            self.pending += [Metric(k, float(v), now, epoch) for k, v in values.items()
                             if k != "epoch"]
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
        init_weights: Path | None = None, progress: bool = True,
        dataset_stats: Path = DATASET_STATS, validation_report: Path = VALIDATION) -> Path:
    """Train (resuming from ``out_dir`` when possible); returns the checkpoint path.

    The validate stage's statistics (``dataset_stats``) and report go into the same MLflow
    run: metrics ``dataset.<split>.<name>``, artifact ``validation/validation.json``.
    """
    import mlflow

    run_id = tracking.start_run(run_file=run_file)
    client = mlflow.MlflowClient()
    sections = {k: params[k] for k in LIBRARY}
    logged = tracking.flat_params(sections)
    items = list(logged.items())
    for i in range(0, len(items), 100):
        batch = [Param(k, v) for k, v in items[i:i + 100]]
        tracking.retry(lambda b=batch: client.log_batch(run_id, params=b), what="log params")
    md5 = tracking.dvc_hash(str(dataset_dir))
    if md5:
        tracking.retry(lambda: client.set_tag(run_id, "dataset_md5", md5), what="tag run")
    _log_dataset(client, run_id, dataset_stats, validation_report)
    logger = MlflowLogger(run_id)
    try:
        result = fit(model_cfg=params["model"], loss_cfg=params["loss"], data_cfg=params["data"],
                     train_cfg=params["train"], data_root=dataset_dir, out_dir=out_dir,
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
    return result.checkpoint


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
    except (CheckpointError, AnnotationError, ImageLoadError, FileNotFoundError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    print(f"train: checkpoint {checkpoint}")
    return 0
