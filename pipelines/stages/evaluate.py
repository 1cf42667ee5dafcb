"""The ``evaluate`` stage: COCOeval of the trained checkpoint on the val split.

Reads the training checkpoint (``detr.train``: ``params``, ``model``, ``label_map``) and the
canonical dataset's ``annotations/val.json`` + ``images/val/``. Writes

- ``metrics_path`` (``metrics/coco.json``, DVC metrics): ``{name: float}`` for the 12
  ``detr.evaluation.STAT_NAMES``, -1.0 where pycocotools leaves a statistic undefined;
- ``report_dir/coco_table.txt``: pycocotools' 12-line AP/AR summary (also printed);
- ``report_dir/per_class_ap.json``: ``{class: AP@[.50:.95] or null}`` (null: no val object);
- ``report_dir/examples/<image_id>.png``: ground truth beside predictions (score >=
  ``evaluate.score_threshold``) for the first ``evaluate.num_examples`` val images by id;
- ``plots_dir/pr_curve.csv`` (DVC plots): ``recall,all,<class>...``: at COCO's 101 recall
  points, the precision (averaged over IoU .50:.95) of the overall curve (``all``, the mean
  of the classes) and of each class with val objects;
- ``plots_dir/ap_by_size.csv``: ``size,AP,AR`` for small, medium, large (-1: no such objects);
- ``report_dir/figures/``: ``pr_curves.png``, ``ap_by_size.png``, ``train_loss.png`` (from
  ``plots_dir/train_loss.csv``, columns ``epoch,loss,...``, when the train stage wrote it),
  ``val_ap.png`` (from ``plots_dir/val_ap.csv``, ``step,AP,...``, when it has rows),
  ``query_specialisation.png`` (the box centres every query predicts over val, from the raw
  per-query predictions) and ``examples_grid.png`` (the examples in one picture);
- ``report_dir/attention/<image_id>.png``: for the first ``evaluate.attention_images`` val
  images, the last decoder layer's cross-attention of their ``evaluate.attention_queries``
  best-scoring queries (:mod:`detr.attention`);
- ``report_dir/diagnosis.json``: why the model is weak and the setting to turn
  (:mod:`pipelines.reporting.diagnosis`, :mod:`detr.diagnosis`): object sizes against the
  feature stride, class-agnostic AP, recall at IoU 0.1, AP per decoder layer, the loss and val
  AP curves, duplicate boxes; also printed;
- with masks / panoptic maps in the predictions (a segmentation model):
  ``metrics_path``'s folder gets ``segm.json`` (``mask_AP``... : mask AP / AR) and
  ``panoptic.json`` (``PQ``, ``SQ``, ``RQ``, ``_th``, ``_st``), each ``{}`` when not measured
  (a detection model), and ``report_dir`` the mask table and PQ table with per-class numbers
  (:mod:`pipelines.reporting.segmentation`);
- ``report_dir/report.html``: all of the above in one self-contained HTML file
  (:mod:`pipelines.reporting.report`).

The PNGs are DVC plots (``plots:`` in dvc.yaml), next to the CSVs.

With ``evaluate.tile`` the val split is evaluated on whole images (a tiled dataset's
``annotations/val_whole.json``, see ``prepare.tile``), each predicted tile by tile
(:mod:`pipelines.measurement`): the AP a user gets with ``python -m detr.predict --tile`` on
their large images. ``query_specialisation.png`` is then left out (merged detections are not
one per query).

Classes are named by category name (``<name>_<id>`` where names repeat or one is ``all``).
With ``run_file`` present (the MLflow run the train stage started) the run also gets the
statistics as metrics (undefined ones left out), ``AP_class_<class>`` metrics, the
diagnosis's ``diag_*`` metrics and, under ``evaluation/``: ``coco_table.txt``,
``diagnosis.json``, the tables ``coco_stats.json`` and ``per_class_ap.json``, the figures (``pr_curves.png`` ...), ``examples/``, ``attention/`` and ``report.html``;
with masks also the ``mask_*`` statistics and ``mask_AP_class_<class>``, with panoptic maps
the PQ statistics and ``PQ_class_<class>``, and their tables and per-class files.
Inside a Prefect flow run, the table is also the ``coco-ap-ar`` artifact (with masks also
``mask-ap-ar``, with panoptic maps ``panoptic-quality``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow

from detr.checkpoint import CheckpointError
from detr.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from detr.data.coco import AnnotationError, ImageLoadError
from detr.evaluation import CocoEvaluation, format_per_class
from detr.queries import query_boxes
from pipelines import params as pipeline_params
from pipelines import stage, tracking
from pipelines.measurement import (
    ALL,
    EvaluationInputError,
    class_labels,
    measure,
    per_class_ap,
    with_tile,
)
from pipelines.params import EvaluateConfig
from pipelines.reporting.diagnosis import FILE as DIAGNOSIS_FILE
from pipelines.reporting.diagnosis import run_diagnosis
from pipelines.reporting.pictures import image_sizes, write_attention, write_examples, write_figures
from pipelines.reporting.plots import SIZES
from pipelines.reporting.report import Picture, write_report
from pipelines.reporting.segmentation import (
    MASK_PER_CLASS,
    MASK_TABLE,
    PANOPTIC_PER_CLASS,
    PANOPTIC_TABLE,
    SegmentationResults,
    evaluate_segmentation,
    metric_safe,
    panoptic_rows,
    segmentation_metrics,
    segmentation_text,
    write_segmentation,
)

DEFAULT_CHECKPOINT = Path("checkpoints/best.pth")  # the train stage's best by val AP
ARTIFACT_DIR = "evaluation"
FIGURE_CAPTIONS = {
    "pr_curves.png": "Precision-recall per class and overall (all areas, 100 detections)",
    "ap_by_size.png": "AP and AR by COCO object size",
    "train_loss.png": "Training loss by epoch (train stage)",
    "val_ap.png": "Val AP during training (train stage); the best is best.pth, evaluated here",
    "query_specialisation.png": "What each object query specialises in: the centre of the "
                                "box it predicts on every val image",
}


def run(*, checkpoint: Path, dataset_dir: Path, cfg: EvaluateConfig, data_cfg: DataConfig,
        train_cfg: TrainConfig, metrics_path: Path = Path("metrics/coco.json"),
        plots_dir: Path = Path("plots"), report_dir: Path = Path("reports/evaluation"),
        run_file: Path | None = tracking.RUN_FILE) -> CocoEvaluation:
    """Evaluate ``checkpoint`` on ``dataset_dir``'s val split; write the files of the module
    doc, log to the MLflow run of ``run_file`` if it exists, print the AP/AR table.

    Device and precision follow ``train_cfg`` (``device``, ``precision``, ``channels_last``),
    val resizing ``data_cfg`` (``scales``, ``max_size``, ``num_workers``).

    Raises:
        FileNotFoundError: no checkpoint file, or no ``annotations/val.json`` under the dataset.
        CheckpointError: the checkpoint is not a readable training checkpoint.
        EvaluationInputError: the checkpoint's categories are not the val split's.
    """
    checkpoint, dataset_dir = Path(checkpoint), Path(dataset_dir)
    report_dir, plots_dir = Path(report_dir), Path(plots_dir)
    cfg = with_tile(cfg, dataset_dir)
    measured = measure(checkpoint, dataset_dir, cfg=cfg, data_cfg=data_cfg, train_cfg=train_cfg,
                       layers=True)
    evaluation, val, predictions = measured.evaluation, measured.val, measured.predictions
    model, model_cfg, category_ids = measured.model, measured.model_cfg, measured.category_ids
    labels = class_labels(evaluation)
    print(evaluation.table)
    print(format_per_class(evaluation))
    _write_reports(evaluation, labels, Path(metrics_path), plots_dir, report_dir)
    segmentation = evaluate_segmentation(predictions, val.coco)
    if segmentation:
        print(segmentation_text(segmentation))
    write_segmentation(segmentation, labels, metrics_dir=Path(metrics_path).parent,
                       report_dir=report_dir)
    diagnosis = run_diagnosis(measured, evaluation, data_cfg=data_cfg,
                              score_threshold=cfg.score_threshold, plots_dir=plots_dir,
                              report_dir=report_dir, nms=cfg.nms)
    examples = write_examples(val, predictions, report_dir / "examples", cfg)
    attention = write_attention(model, val, category_ids, report_dir / "attention", cfg)
    queries = None if measured.tiled else query_boxes(measured.raw_predictions,
                                                      image_sizes(val))
    figures = write_figures(evaluation, labels, plots_dir, report_dir / "figures", queries,
                            examples)
    report = write_report(
        report_dir / "report.html", evaluation=evaluation, labels=labels,
        facts=_facts(checkpoint, dataset_dir, model_cfg, evaluation, train_cfg, cfg),
        figures=[Picture(figures[n], FIGURE_CAPTIONS[n]) for n in FIGURE_CAPTIONS
                 if n in figures],
        attention=[Picture(p, f"val image {p.stem}", photo=True) for p in attention],
        examples=[Picture(p, f"val image {p.stem}", photo=True) for p in examples],
        diagnosis=diagnosis, segmentation=segmentation)
    print(f"evaluate: report written to {report}")
    _publish_tables(evaluation, segmentation, labels, f"{checkpoint} on {dataset_dir} (val)")
    if run_file is not None and Path(run_file).is_file():
        _log_to_mlflow(Path(run_file), evaluation, labels, report_dir, figures,
                       {**diagnosis.metrics(), **segmentation_metrics(segmentation, labels)},
                       segmentation)
    elif run_file is not None:
        print(f"evaluate: no MLflow run file at {run_file}; results not logged to MLflow",
              file=sys.stderr)
    return evaluation


def stat_rows(evaluation: CocoEvaluation) -> list[dict]:
    """``[{"metric", "value", "line"}]``: each statistic with its line of the COCO table
    (names ``mask_AP``... for a mask evaluation)."""
    lines = evaluation.table.splitlines()
    return [{"metric": name, "value": evaluation.stats[name], "line": line.strip()}
            for name, line in zip(evaluation.names, lines, strict=True)]


def _publish_tables(evaluation: CocoEvaluation, segmentation: SegmentationResults,
                    labels: dict[int, str], what: str) -> None:
    """The Prefect table artifacts (inside a flow run): box, mask and PQ tables."""
    stage.publish_table(key="coco-ap-ar", rows=stat_rows(evaluation),
                        description=f"COCO AP/AR of {what}")
    if segmentation.masks is not None:
        stage.publish_table(key="mask-ap-ar", rows=stat_rows(segmentation.masks),
                            description=f"COCO mask AP/AR of {what}")
    if segmentation.panoptic is not None:
        stage.publish_table(key="panoptic-quality",
                            rows=panoptic_rows(segmentation.panoptic, labels),
                            description=f"Panoptic quality (PQ, SQ, RQ) of {what}")


def _facts(checkpoint: Path, dataset_dir: Path, model_cfg: ModelConfig,
           evaluation: CocoEvaluation, train_cfg: TrainConfig,
           cfg: EvaluateConfig) -> dict[str, object]:
    """The report's header lines."""
    tile = cfg.tile
    split = ("val split" if tile is None else
             f"val split, whole images, tiled prediction: tile {tile.size}, overlap "
             f"{tile.overlap}, merge {tile.match} {tile.threshold}")
    return {
        "checkpoint": checkpoint, "dataset": f"{dataset_dir} ({split})",
        "model": f"DETR {model_cfg.backbone}{' DC5' if model_cfg.dilation else ''}, "
                 f"{model_cfg.enc_layers}+{model_cfg.dec_layers} layers, d={model_cfg.hidden_dim}, "
                 f"{model_cfg.num_queries} queries, {model_cfg.num_classes} classes",
        "val images": evaluation.num_images, "detections scored": evaluation.num_detections,
        "device / precision": f"{train_cfg.device} / {train_cfg.precision}",
        "evaluated at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _write_reports(evaluation: CocoEvaluation, labels: dict[int, str], metrics_path: Path,
                   plots_dir: Path, report_dir: Path) -> None:
    per_class = per_class_ap(evaluation)
    _write_text(metrics_path, json.dumps(evaluation.stats, indent=2) + "\n")
    _write_text(report_dir / "coco_table.txt", evaluation.table + "\n")
    _write_text(report_dir / "per_class_ap.json", json.dumps(per_class, indent=2) + "\n")
    curves = _pr_curves(evaluation, labels)
    _write_csv(plots_dir / "pr_curve.csv", ["recall", *curves], _pr_rows(curves))
    _write_csv(plots_dir / "ap_by_size.csv", ["size", "AP", "AR"],
               [[s, evaluation.stats[f"AP_{s}"], evaluation.stats[f"AR_{s}"]] for s in SIZES])


def _pr_curves(evaluation: CocoEvaluation, labels: dict[int, str]) -> dict:
    """``{class: PrecisionRecallCurve}``: ``all`` first, then classes with val objects."""
    curves = {ALL: evaluation.pr_curve} if evaluation.pr_curve is not None else {}
    curves.update({labels[c]: curve for c, curve in evaluation.pr_curves.items()})
    return curves


def _pr_rows(curves: dict) -> list[list]:
    """Wide rows for DVC plots: recall, then the precision (IoU .50:.95) of each curve."""
    if not curves:
        return []
    recall = next(iter(curves.values())).recall
    return [[r, *(c.precision_50_95[i] for c in curves.values())] for i, r in enumerate(recall)]


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _log_to_mlflow(run_file: Path, evaluation: CocoEvaluation, labels: dict[int, str],
                   report_dir: Path, figures: dict[str, Path], extra: dict[str, float],
                   segmentation: SegmentationResults) -> None:
    """Everything of the module doc into the run of ``run_file``; server calls retried.
    ``extra``: more metrics (diagnosis, masks, PQ)."""
    import mlflow

    with tracking.resume_run(run_file):
        metrics = {**_defined(evaluation.stats), **_class_metrics(evaluation, labels),
                   **extra}
        _retry("log the COCO metrics", mlflow.log_metrics, metrics)
        _retry("log the COCO table", mlflow.log_text, evaluation.table + "\n",
               f"{ARTIFACT_DIR}/coco_table.txt")
        for name, data in _tables(evaluation, labels).items():
            _retry(f"log table {name}", mlflow.log_table, data=data,
                   artifact_file=f"{ARTIFACT_DIR}/{name}")
        for name, path in figures.items():
            _retry(f"log {name}", mlflow.log_artifact, str(path), ARTIFACT_DIR)
        for folder in ("examples", "attention"):
            if any((report_dir / folder).glob("*.png")):
                _retry(f"log the {folder}", mlflow.log_artifacts, str(report_dir / folder),
                       f"{ARTIFACT_DIR}/{folder}")
        for name in (DIAGNOSIS_FILE, "report.html", *_segmentation_files(segmentation)):
            _retry(f"log {name}", mlflow.log_artifact, str(report_dir / name), ARTIFACT_DIR)


def _segmentation_files(segmentation: SegmentationResults) -> list[str]:
    """The report files :func:`write_segmentation` wrote for what was measured."""
    masks = [MASK_TABLE, MASK_PER_CLASS] if segmentation.masks is not None else []
    panoptic = [PANOPTIC_TABLE, PANOPTIC_PER_CLASS] if segmentation.panoptic is not None else []
    return masks + panoptic


def _retry(what: str, fn, *args, **kwargs) -> None:
    tracking.retry(lambda: fn(*args, **kwargs), what=what)


def _tables(evaluation: CocoEvaluation, labels: dict[int, str]) -> dict[str, dict]:
    """MLflow tables by artifact name. ``mlflow.log_table`` appends to a table the run already
    has (evaluate run again in the same run): ``evaluated_at`` tells the evaluations apart."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    rows = stat_rows(evaluation)
    per_class = evaluation.per_class_ap
    return {
        "coco_stats.json": {"metric": [r["metric"] for r in rows],
                            "value": [r["value"] for r in rows], "evaluated_at": [stamp] * 12},
        "per_class_ap.json": {"class": [labels[c] for c in per_class],
                              "category_id": list(per_class), "AP": list(per_class.values()),
                              "evaluated_at": [stamp] * len(per_class)},
    }


def _defined(stats: dict[str, float]) -> dict[str, float]:
    """Statistics other than pycocotools' -1 ("undefined"), which would chart as a score."""
    return {name: value for name, value in stats.items() if value != -1.0}


def _class_metrics(evaluation: CocoEvaluation, labels: dict[int, str]) -> dict[str, float]:
    """``AP_class_<class>`` for classes with val objects (:func:`metric_safe` names)."""
    return {"AP_class_" + metric_safe(labels[c]): ap
            for c, ap in evaluation.per_class_ap.items() if ap is not None}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(checkpoint: Path, dataset_dir: Path, cfg: EvaluateConfig,
                  data_cfg: DataConfig, train_cfg: TrainConfig,
                  metrics_path: Path = Path("metrics/coco.json"), plots_dir: Path = Path("plots"),
                  report_dir: Path = Path("reports/evaluation"),
                  run_file: Path | None = tracking.RUN_FILE) -> CocoEvaluation:
    """Prefect flow over :func:`run` (same arguments, same result)."""
    return run(checkpoint=checkpoint, dataset_dir=dataset_dir, cfg=cfg, data_cfg=data_cfg,
               train_cfg=train_cfg, metrics_path=metrics_path, plots_dir=plots_dir,
               report_dir=report_dir, run_file=run_file)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines evaluate``: 0 when done, 2 for unusable params, checkpoint or data
    (the message, on stderr, names the file)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=pipeline_params.PARAMS_FILE,
                        help="evaluate, data and train sections")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="the train stage's best.pth")
    parser.add_argument("--data", type=Path, default=Path("data/dataset"),
                        help="canonical dataset folder")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/coco.json"),
                        help="COCO statistics JSON (DVC metrics)")
    parser.add_argument("--plots", type=Path, default=Path("plots"), help="CSVs for DVC plots")
    parser.add_argument("--reports", type=Path, default=Path("reports/evaluation"),
                        help="table, per-class AP, figures, examples, attention, report.html")
    parser.add_argument("--run-file", type=Path, default=tracking.RUN_FILE,
                        help="MLflow run of the train stage (skipped when absent)")
    args = parser.parse_args(argv)
    try:
        params = pipeline_params.load(args.params)
        stage.invoke(evaluate_flow, run, checkpoint=args.checkpoint, dataset_dir=args.data,
                     cfg=params["evaluate"], data_cfg=params["data"], train_cfg=params["train"],
                     metrics_path=args.metrics, plots_dir=args.plots, report_dir=args.reports,
                     run_file=args.run_file)
    except (ConfigError, CheckpointError, EvaluationInputError, FileNotFoundError,
            ImageLoadError, AnnotationError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
