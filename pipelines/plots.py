"""The evaluate stage's matplotlib figures, logged to MLflow by :mod:`pipelines.evaluate`.

:func:`evaluation_figures` gives ``pr_curves.png`` (precision-recall per class and overall),
``ap_by_size.png`` (AP and AR by COCO object size) and, when the train stage wrote
``plots_dir/train_loss.csv`` (columns ``epoch,loss,...``), ``train_loss.png``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from matplotlib.figure import Figure

from detr.evaluation import CocoEvaluation
from detr.visualize import class_color

ALL = "all"  # the class name of the mean PR curve
SIZES = ("small", "medium", "large")


def evaluation_figures(evaluation: CocoEvaluation, labels: dict[int, str],
                       plots_dir: Path) -> dict[str, Figure]:
    """The figures by MLflow artifact name (the module doc)."""
    figures = {"pr_curves.png": _pr_figure(evaluation, labels),
               "ap_by_size.png": _size_figure(evaluation.stats)}
    loss = _read_loss(plots_dir / "train_loss.csv")
    if loss:
        figures["train_loss.png"] = _loss_figure(*loss)
    return figures


def _pr_figure(evaluation: CocoEvaluation, labels: dict[int, str]) -> Figure:
    """Two panels, IoU .50:.95 averaged and IoU .50; one curve per class, ``all`` in black."""
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for ax, key, title in zip(axes, ("precision_50_95", "precision_50"),
                              ("IoU .50:.95 (averaged)", "IoU .50"), strict=True):
        for cat, curve in evaluation.pr_curves.items():
            ax.plot(curve.recall, getattr(curve, key), label=labels[cat], linewidth=1,
                    color=[v / 255 for v in class_color(cat)])
        if evaluation.pr_curve is not None:
            ax.plot(evaluation.pr_curve.recall, getattr(evaluation.pr_curve, key), label=ALL,
                    color="black", linewidth=2.5)
        ax.set(title=f"Precision-recall, {title}", xlabel="recall", xlim=(0, 1),
               ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("precision")
    if len(evaluation.pr_curves) <= 20:  # beyond that a legend hides the curves
        axes[1].legend(fontsize="small", loc="upper right")
    return figure


def _size_figure(stats: dict[str, float]) -> Figure:
    """AP and AR by COCO object size; sizes with no val objects show ``n/a``, not a bar."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for offset, kind in ((-0.2, "AP"), (0.2, "AR")):
        values = [stats[f"{kind}_{size}"] for size in SIZES]
        xs = [i + offset for i in range(len(SIZES))]
        ax.bar(xs, [max(v, 0.0) for v in values], width=0.4, label=kind)
        for x, value in zip(xs, values, strict=True):
            ax.text(x, max(value, 0.0) + 0.01, "n/a" if value == -1.0 else f"{value:.3f}",
                    ha="center", fontsize="small")
    ax.set(xticks=range(len(SIZES)), xticklabels=SIZES, ylim=(0, 1.05), ylabel="score",
           title="COCO AP / AR by object size (IoU .50:.95)")
    ax.legend()
    return figure


def _read_loss(path: Path) -> tuple[list[float], list[float]] | None:
    """``(epochs, losses)`` from the train stage's CSV, or None when absent or unusable."""
    if not path.is_file():
        return None
    try:
        with path.open(newline="") as f:
            rows = [(float(r["epoch"]), float(r["loss"])) for r in csv.DictReader(f)]
    except (KeyError, TypeError, ValueError) as exc:
        print(f"evaluate: {path}: no epoch,loss columns ({exc}); loss curve skipped",
              file=sys.stderr)
        return None
    return ([s for s, _ in rows], [v for _, v in rows]) if rows else None


def _loss_figure(epochs: list[float], losses: list[float]) -> Figure:
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    ax.plot(epochs, losses, linewidth=1, marker="o")
    ax.set(title="Training loss (epoch mean)", xlabel="epoch", ylabel="loss")
    ax.grid(alpha=0.3)
    return figure
