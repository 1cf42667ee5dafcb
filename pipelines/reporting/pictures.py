"""The evaluate stage's pictures: examples, attention maps and figures, written as PNGs.

Small images are enlarged (nearest neighbour) to ``EXAMPLE_MIN_SIDE`` so that box captions
stay legible; every writer first removes the PNGs an earlier run left in its folder, so a
smaller ``evaluate.num_examples`` does not leave stale pictures behind (they are DVC plots).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from detr.attention import top_query_attention
from detr.data.coco import CocoDetection
from detr.evaluation import CocoEvaluation
from detr.masks_out import rle_decode
from detr.models.postprocess import PostProcess
from detr.queries import QueryBoxes
from detr.visualize import attention_figure, draw_detections, example_grid, side_by_side
from pipelines.params import EvaluateConfig
from pipelines.reporting.plots import evaluation_figures, query_figure

EXAMPLE_MIN_SIDE = 256  # px: small images are enlarged so box captions stay legible
FIGURE_DPI = 110


def write_examples(val: CocoDetection, predictions: dict[int, dict], out_dir: Path,
                   cfg: EvaluateConfig) -> list[Path]:
    """``out_dir/<image_id>.png`` for the first ``cfg.num_examples`` images of ``val``:
    ground truth (left) beside detections scoring >= ``cfg.score_threshold`` (right).
    Earlier PNGs in ``out_dir`` are removed first. Returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    masks = any("masks" in found for found in predictions.values())  # a segmentation model
    # original pixels and xyxy pixel boxes (and the masks, for a segmentation model)
    raw = CocoDetection(val.image_dir, val.ann_file, masks=masks)
    names = {c["id"]: c["name"] for c in raw.categories}
    paths = []
    for index in range(min(cfg.num_examples, len(raw))):
        image, target = raw[index]
        truth = draw_detections(image, target["boxes"],
                                [raw.label_to_category[i] for i in target["labels"].tolist()],
                                None, names, min_side=EXAMPLE_MIN_SIDE,
                                masks=target["masks"].bool() if masks else None)
        found = predictions[target["image_id"]]
        shown = draw_detections(image, found["boxes"], found["labels"], found["scores"], names,
                                score_threshold=cfg.score_threshold, min_side=EXAMPLE_MIN_SIDE,
                                masks=_decoded(found.get("masks")))
        paths.append(out_dir / f"{target['image_id']}.png")
        side_by_side(truth, shown).save(paths[-1])
    return paths


def _decoded(masks) -> torch.Tensor | None:
    """Masks as the evaluation keeps them (a list of COCO RLE, every query's; or an array)
    -> bool [N, H, W]; None stays None."""
    if masks is None:
        return None
    if isinstance(masks, list):
        return torch.stack([rle_decode(rle) for rle in masks]) if masks else None
    return torch.as_tensor(masks).bool()


def write_attention(model, val: CocoDetection, category_ids: list | None, out_dir: Path,
                    cfg: EvaluateConfig) -> list[Path]:
    """``out_dir/<image_id>.png`` for the first ``cfg.attention_images`` images of ``val``:
    their ``cfg.attention_queries`` best-scoring detections and where each one's query
    looked (:func:`detr.visualize.attention_figure`); small images enlarged to
    ``EXAMPLE_MIN_SIDE``. Earlier PNGs in ``out_dir`` are removed first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    raw = CocoDetection(val.image_dir, val.ann_file)
    names = {c["id"]: c["name"] for c in raw.categories}
    device = next(model.parameters()).device
    postprocess = PostProcess(category_ids).to(device)
    model.eval()
    paths = []
    for index in range(min(cfg.attention_images, len(val))):
        image, target = val[index]
        pixels, _ = raw[index]
        height, width = pixels.shape[-2:]
        factor = max(1, math.ceil(EXAMPLE_MIN_SIDE / min(height, width)))
        display = (height * factor, width * factor)
        found = top_query_attention(model, image.to(device), postprocess=postprocess,
                                    orig_size=(height, width), top_k=cfg.attention_queries,
                                    display_size=display)
        shown = TF.resize(pixels, list(display), interpolation=TF.InterpolationMode.NEAREST)
        paths.append(out_dir / f"{target['image_id']}.png")
        attention_figure(shown, found, names, columns=min(len(found) + 1, 5)).save(paths[-1])
    return paths


def write_figures(evaluation: CocoEvaluation, labels: dict[int, str], plots_dir: Path,
                  out_dir: Path, queries: QueryBoxes | None,
                  examples: list[Path]) -> dict[str, Path]:
    """The PNGs of the module doc in ``out_dir`` (earlier ones removed); by file name.
    ``queries`` None (tiled prediction: no one query per box): no query_specialisation.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    figures = evaluation_figures(evaluation, labels, plots_dir)
    if queries is not None:
        figures["query_specialisation.png"] = query_figure(queries)
    paths = {}
    for name, figure in figures.items():
        paths[name] = out_dir / name
        figure.savefig(paths[name], dpi=FIGURE_DPI)
    if examples:
        paths["examples_grid.png"] = out_dir / "examples_grid.png"
        example_grid(_load_images(examples), columns=2, gap=12).save(paths["examples_grid.png"])
    return paths


def image_sizes(val: CocoDetection) -> dict[int, tuple[int, int]]:
    """(height, width) of every val image, by id, from the annotations."""
    return {int(i): (int(img["height"]), int(img["width"])) for i, img in val.coco.imgs.items()}


def _load_images(paths: list[Path]) -> list[Image.Image]:
    """The example PNGs read into memory (Pillow closes a single-frame file once loaded)."""
    return [Image.open(path).convert("RGB") for path in paths]
