"""The evaluate stage's matplotlib figures, saved and logged to MLflow by
:mod:`pipelines.stages.evaluate`.

:func:`evaluation_figures` gives ``pr_curves.png`` (precision-recall per class and overall),
``ap_by_size.png`` (AP and AR by COCO object size) and, when the train stage wrote
``plots_dir/train_loss.csv`` (columns ``epoch,loss,...``), ``train_loss.png`` (the total loss
and each ``loss_*`` term); when it wrote ``plots_dir/val_ap.csv`` with rows (``step,AP,...``),
``val_ap.png`` (val AP during training, the best marked). :func:`query_figure` is the paper's "what each query specialises
in" picture.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from detr.evaluation import CocoEvaluation
from detr.queries import QueryBoxes
from detr.visualize import box_shape_colors, class_color
from pipelines.measurement import ALL  # the class name of the mean PR curve

SIZES = ("small", "medium", "large")
_AUX_TERM = re.compile(r"_\d+$")  # loss_ce_0: an auxiliary decoder layer's term


def evaluation_figures(evaluation: CocoEvaluation, labels: dict[int, str],
                       plots_dir: Path) -> dict[str, Figure]:
    """The figures by MLflow artifact name (the module doc)."""
    figures = {"pr_curves.png": _pr_figure(evaluation, labels),
               "ap_by_size.png": _size_figure(evaluation.stats)}
    loss = read_loss(plots_dir / "train_loss.csv")
    if loss:
        figures["train_loss.png"] = _loss_figure(*loss)
    curve = read_val_curve(plots_dir / "val_ap.csv")
    if curve:
        figures["val_ap.png"] = _val_figure(curve)
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


def query_figure(queries: QueryBoxes, *, max_panels: int = 100) -> Figure:
    """One small square per query (the first ``max_panels``): the centre of the box it
    predicts on each image, in that image's normalised coordinates (top left = (0, 0)),
    coloured by the box's size and shape (:func:`detr.visualize.box_shape_colors`)."""
    count = min(queries.num_queries, max_panels)
    columns = min(10, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(1.45 * columns, 1.45 * rows + 0.8), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    size = max(2.0, 40 / math.sqrt(max(len(queries.image_ids), 1)))  # fewer points, bigger
    for index, ax in enumerate(axes.flat):
        ax.set(xticks=[], yticks=[], xlim=(0, 1), ylim=(1, 0), aspect="equal")
        if index >= count:
            ax.set_axis_off()
            continue
        boxes = queries.boxes[index]
        order = (boxes[:, 2] * boxes[:, 3]).argsort(descending=True)  # small boxes on top
        ax.scatter(boxes[order, 0], boxes[order, 1], s=size, linewidths=0,
                   c=box_shape_colors(boxes[order, 2], boxes[order, 3]).numpy())
        ax.set_title(f"query {index}", fontsize=8, pad=2)
    shown = "" if count == queries.num_queries else f" (first {count})"
    figure.suptitle(f"Box centres predicted by each query{shown} on {len(queries.image_ids)} "
                    f"val images\ngreen: small box; red: large, wide; blue: large, tall; "
                    f"purple: large, square",
                    fontsize=9)
    return figure


def read_loss(path: Path) -> tuple[list[float], dict[str, list[float]]] | None:
    """``(epochs, {"loss": ..., "loss_ce": ...})`` from the train stage's CSV (the total and
    the last decoder layer's ``loss_*`` terms; ``loss_ce_0``... of the auxiliary layers
    are left out), or None when absent or unusable."""
    if not path.is_file():
        return None
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        names = [c for c in rows[0] if c == "loss" or (c.startswith("loss_")
                                                       and not _AUX_TERM.search(c))] if rows else []
        epochs = [float(r["epoch"]) for r in rows]
        curves = {c: [float(r[c]) if r[c] not in ("", None) else math.nan for r in rows]
                  for c in names}
    except (KeyError, TypeError, ValueError) as exc:
        print(f"evaluate: {path}: no epoch,loss columns ({exc}); loss curve skipped",
              file=sys.stderr)
        return None
    if not rows or "loss" not in curves:
        return None
    return epochs, curves


def _loss_figure(epochs: list[float], curves: dict[str, list[float]]) -> Figure:
    """Total loss (left) and its unweighted terms (right) by epoch."""
    terms = {k: v for k, v in curves.items() if k != "loss"}
    figure = Figure(figsize=(11 if terms else 6, 4), layout="constrained")
    axes = figure.subplots(1, 2 if terms else 1, squeeze=False)[0]
    axes[0].plot(epochs, curves["loss"], linewidth=1.5, marker="o", color="black")
    axes[0].set(title="Training loss (epoch mean)", xlabel="epoch", ylabel="loss")
    if terms:
        for name, values in sorted(terms.items()):
            axes[1].plot(epochs, values, linewidth=1, marker=".", label=name)
        axes[1].set(title="Loss terms (unweighted, last decoder layer)", xlabel="epoch")
        axes[1].legend(fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def read_val_curve(path: Path) -> list[tuple[int, float]]:
    """``[(step, AP)]`` of the train stage's ``val_ap.csv``; [] when absent or unusable."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as f:
            return [(int(float(row["step"])), float(row["AP"])) for row in csv.DictReader(f)]
    except (KeyError, TypeError, ValueError) as exc:
        print(f"evaluate: {path}: no step,AP columns ({exc}); val curve left out",
              file=sys.stderr)
        return []


def _val_figure(curve: list[tuple[int, float]]) -> Figure:
    """Val AP by optimiser step; the best evaluation (the weights in best.pth) marked."""
    steps, aps = zip(*curve, strict=True)
    best = max(range(len(aps)), key=aps.__getitem__)
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    ax.plot(steps, aps, marker="o", color="black", linewidth=1.5)
    ax.scatter([steps[best]], [aps[best]], s=120, facecolors="none", edgecolors="tab:red",
               linewidths=2, label=f"best: {aps[best]:.3f} at step {steps[best]} (best.pth)",
               zorder=3)
    ax.set(title="Val AP during training", xlabel="optimiser step", ylabel="AP (IoU .50:.95)",
           ylim=(0, max(max(aps) * 1.15, 0.05)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return figure
