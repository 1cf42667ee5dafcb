"""Pictures of detections: boxes on images, ground truth beside predictions, grids of examples.

Input contract (as detections leave :mod:`detr`): ``boxes`` [N, 4] absolute xyxy pixels of the
image drawn on, ``labels`` [N] category ids, ``scores`` [N] in [0, 1] or ``None`` for ground
truth; instance ``masks`` (optional) bool [N, H, W] of the image's size, row i = box i,
painted translucent in the box's colour under the boxes. Images are a uint8 ``Tensor`` [3, H, W] (or [1, H, W], grey) or a ``PIL.Image``; every
function returns a new RGB ``PIL.Image`` and leaves its inputs untouched.

Colours are fixed per category id (:func:`class_color`), so one class has the same colour in
every picture of a run and across runs. Attention maps (:func:`attention_figure`) are heat maps
in [0, 1] over the image, as :mod:`detr.attention` makes them, drawn dark (low) to yellow (high).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

ImageLike = Tensor | Image.Image
_GOLDEN = 0.618033988749895  # hue step: consecutive ids land far apart on the colour wheel
_TITLE_PAD = 3  # px around a panel title
_TITLE_FONT_SIZE = 13
MASK_ALPHA = 0.45  # opacity of a painted mask: the object stays visible under its colour
# Heat colours at 0, .25, .5, .75, 1 (a dark-to-bright ramp in the spirit of "inferno").
_HEAT_ANCHORS = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))


def class_color(category_id: int) -> tuple[int, int, int]:
    """A saturated RGB colour for ``category_id``, the same on every call."""
    hue = (int(category_id) * _GOLDEN) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def draw_detections(image: ImageLike, boxes: Tensor | Sequence, labels: Tensor | Sequence,
                    scores: Tensor | Sequence | None = None,
                    names: Mapping[int, str] | None = None, *, score_threshold: float = 0.5,
                    min_side: int = 0, masks: Tensor | None = None,
                    mask_alpha: float = MASK_ALPHA) -> Image.Image:
    """Draw the boxes scoring at least ``score_threshold`` (all of them when ``scores`` is
    None), each outlined in its class colour and captioned, black on that colour, at its top
    left corner inside: ``name score`` (``name`` for ground truth; the category id where
    ``names`` lacks it).

    ``min_side``: enlarge the picture (nearest neighbour, boxes scaled along) until its short
    side is at least this many pixels, so captions stay legible on small images.
    ``masks``: bool [N, H, W] (the image's size), painted under the boxes in their class
    colours at opacity ``mask_alpha``.

    Raises:
        ValueError: the image is not [1 or 3, H, W], boxes, labels, scores and masks differ in
            length, or the masks are not the image's size.
    """
    pixels = _as_uint8(image)
    boxes, labels, scores = _check_detections(boxes, labels, scores)
    if masks is not None:
        masks = _check_masks(masks, len(boxes), pixels.shape[-2:])
    if scores is not None:
        keep = scores >= score_threshold
        boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
        masks = None if masks is None else masks[keep]
    pixels, boxes = _enlarge(pixels, boxes, min_side)
    if len(boxes) == 0:  # draw_bounding_boxes warns on an empty set
        return F.to_pil_image(pixels)
    if masks is not None:
        pixels = _paint_masks(pixels, masks, labels, mask_alpha)
    height, width = pixels.shape[-2:]
    boxes = _clamp(boxes, height, width)
    shown = [None] * len(labels) if scores is None else scores.tolist()
    captions = [_caption(c, names, s) for c, s in zip(labels.tolist(), shown, strict=True)]
    drawn = draw_bounding_boxes(pixels, boxes, labels=captions,
                                colors=[class_color(int(c)) for c in labels.tolist()],
                                width=max(1, min(height, width) // 160), fill_labels=True)
    return F.to_pil_image(drawn)


def side_by_side(left: ImageLike, right: ImageLike,
                 titles: tuple[str, str] | None = ("ground truth", "prediction")) -> Image.Image:
    """``left`` and ``right`` next to each other on a white canvas, each under its title
    (no title band when ``titles`` is None); a 4 px gap between them."""
    panels = [_as_pil(left), _as_pil(right)]
    band = _title_height(titles)
    gap = 4
    canvas = Image.new("RGB", (panels[0].width + gap + panels[1].width,
                               band + max(p.height for p in panels)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for index, panel in enumerate(panels):
        canvas.paste(panel, (x, band))
        if titles is not None:
            draw.text((x + _TITLE_PAD, _TITLE_PAD), titles[index], fill="black",
                      font=ImageFont.load_default())
        x += panel.width + gap
    return canvas


def example_grid(images: Sequence[ImageLike], columns: int, *,
                 background: str | tuple[int, int, int] = "white",
                 gap: int = 0) -> Image.Image:
    """Images in rows of ``columns``, each in a cell the size of the largest one (top-left
    aligned); ``ceil(len(images) / columns)`` rows, ``gap`` px of background between cells.

    Raises:
        ValueError: no images, or ``columns`` < 1.
    """
    if not images:
        raise ValueError("example_grid: no images to arrange")
    if columns < 1:
        raise ValueError(f"example_grid: columns must be >= 1, got {columns}")
    pictures = [_as_pil(image) for image in images]
    cell_w = max(p.width for p in pictures)
    cell_h = max(p.height for p in pictures)
    columns = min(columns, len(pictures))
    rows = math.ceil(len(pictures) / columns)
    grid = Image.new("RGB", (columns * cell_w + (columns - 1) * gap,
                             rows * cell_h + (rows - 1) * gap), background)
    for index, picture in enumerate(pictures):
        row, column = divmod(index, columns)
        grid.paste(picture, (column * (cell_w + gap), row * (cell_h + gap)))
    return grid


def heat_colors(heat: Tensor) -> Tensor:
    """A heat map [H, W] in [0, 1] -> uint8 RGB [3, H, W], black-purple (0) through red and
    orange to pale yellow (1): bright where attention is high, readable in grey too."""
    anchors = torch.tensor(_HEAT_ANCHORS, dtype=torch.float32)
    position = heat.detach().float().cpu().clamp(0, 1) * (len(anchors) - 1)
    low = position.floor().long().clamp(max=len(anchors) - 2)
    frac = (position - low)[..., None]
    rgb = anchors[low] * (1 - frac) + anchors[low + 1] * frac
    return rgb.round().to(torch.uint8).permute(2, 0, 1)


def overlay_heatmap(image: ImageLike, heat: Tensor, *, alpha: float = 0.6) -> Image.Image:
    """``image`` blended with the colours of ``heat`` [H, W] (the image's size): ``alpha`` of
    heat colour, the rest image.

    Raises:
        ValueError: ``heat`` is not the image's size.
    """
    pixels = _as_uint8(image)
    if tuple(heat.shape) != tuple(pixels.shape[-2:]):
        raise ValueError(f"heat map {tuple(heat.shape)} is not the image's size "
                         f"{tuple(pixels.shape[-2:])}")
    blend = pixels.float() * (1 - alpha) + heat_colors(heat).float() * alpha
    return F.to_pil_image(blend.round().to(torch.uint8))


def attention_figure(image: ImageLike, detections: Sequence, names: Mapping[int, str] | None,
                     *, columns: int = 4, min_side: int = 0) -> Image.Image:
    """DETR's decoder attention, as in the paper's figures: a first panel with every
    detection of ``detections`` drawn, then one panel per detection: its query's attention
    over the image with its box, titled ``query N: name score``.

    ``detections``: :class:`detr.attention.QueryAttention` items whose ``heat`` and ``box``
    are in the pixels of ``image``. ``min_side``: enlarge small images (heat maps bilinear,
    the image nearest) so that the short side is at least this many pixels.

    Raises:
        ValueError: no detections.
    """
    if not detections:
        raise ValueError("attention_figure: no detections to show")
    pixels = _as_uint8(image)
    factor = max(1, math.ceil(min_side / min(pixels.shape[-2:]))) if min_side > 0 else 1
    boxes = torch.stack([d.box for d in detections]).float() * factor
    labels = [d.label for d in detections]
    pixels, _ = _enlarge(pixels, boxes, min_side)
    size = tuple(pixels.shape[-2:])
    panels = [(draw_detections(pixels, boxes, labels, [d.score for d in detections], names,
                               score_threshold=0.0), "detections")]
    for det, box in zip(detections, boxes, strict=True):
        heat = F.resize(det.heat[None].float(), list(size), antialias=True)[0]
        blended = F.pil_to_tensor(overlay_heatmap(pixels, heat / heat.max().clamp(min=1e-12)))
        drawn = draw_detections(blended, box[None], [det.label], None, names)
        panels.append((drawn, f"query {det.query}: {_caption(det.label, names, det.score)}"))
    return example_grid([_titled(panel, title) for panel, title in panels], columns, gap=6)


def box_shape_colors(widths: Tensor, heights: Tensor) -> Tensor:
    """RGB in [0, 1] per box [N, 3] from its normalised width and height, as in the DETR
    paper's query figure: green for small boxes, red for large wide ones, blue for large tall
    ones (in between: mixtures)."""
    widths, heights = widths.float().clamp(0, 1), heights.float().clamp(0, 1)
    large = (widths * heights).sqrt().mul(2).clamp(0, 1)  # 0 for points, 1 from half the image
    wide = widths / (widths + heights).clamp(min=1e-9)
    green = torch.tensor([0.1, 0.7, 0.2])
    red, blue = torch.tensor([0.85, 0.1, 0.1]), torch.tensor([0.1, 0.25, 0.9])
    big = wide[:, None] * red + (1 - wide[:, None]) * blue
    return (1 - large[:, None]) * green + large[:, None] * big


def _titled(image: Image.Image, title: str) -> Image.Image:
    """``image`` under a white band with ``title`` (cut to the image's width)."""
    font = _font()
    height = font.getbbox("Ag")[3] + 2 * _TITLE_PAD
    canvas = Image.new("RGB", (image.width, image.height + height), "white")
    canvas.paste(image, (0, height))
    while title and font.getlength(title) > image.width - 2 * _TITLE_PAD:
        title = title[:-1]
    ImageDraw.Draw(canvas).text((_TITLE_PAD, _TITLE_PAD), title, fill="black", font=font)
    return canvas


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at a readable size (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=_TITLE_FONT_SIZE)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _as_uint8(image: ImageLike) -> Tensor:
    """A uint8 [3, H, W] CPU tensor of ``image`` (grey is repeated to RGB)."""
    if isinstance(image, Image.Image):
        return F.pil_to_tensor(image.convert("RGB"))
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a PIL image or a [3, H, W] tensor, got {shape}")
    pixels = image.detach().cpu().as_subclass(Tensor)
    if pixels.is_floating_point():
        pixels = F.to_dtype(pixels.clamp(0, 1), torch.uint8, scale=True)
    elif pixels.dtype != torch.uint8:
        raise ValueError(f"image tensor must be uint8 or float in [0, 1], got {pixels.dtype}")
    return pixels.expand(3, -1, -1).contiguous() if pixels.shape[0] == 1 else pixels


def _as_pil(image: ImageLike) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else F.to_pil_image(
        _as_uint8(image))


def _check_detections(boxes, labels, scores) -> tuple[Tensor, Tensor, Tensor | None]:
    """float [N, 4] boxes, int64 [N] labels and float [N] scores (or None) on the CPU."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).detach().cpu().reshape(-1, 4)
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1).to(torch.int64)
    if scores is not None:
        scores = torch.as_tensor(scores).detach().cpu().reshape(-1).float()
    counts = [len(boxes), len(labels)] + ([] if scores is None else [len(scores)])
    if len(set(counts)) != 1:
        raise ValueError(f"draw_detections: {len(boxes)} boxes, {len(labels)} labels"
                         + ("" if scores is None else f", {len(scores)} scores"))
    return boxes, labels, scores


def _check_masks(masks: Tensor, count: int, size: Sequence[int]) -> Tensor:
    """bool [N, H, W] masks on the CPU, N = ``count`` and (H, W) = ``size``."""
    masks = torch.as_tensor(masks).detach().cpu().bool()
    if masks.ndim != 3 or len(masks) != count or tuple(masks.shape[-2:]) != tuple(size):
        raise ValueError(f"draw_detections: masks {tuple(masks.shape)} must be [{count}, "
                         f"{size[0]}, {size[1]}] (one per box, the image's size)")
    return masks


def _paint_masks(pixels: Tensor, masks: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """``masks`` blended over ``pixels`` in their class colours (masks resized, nearest, to an
    enlarged picture)."""
    if tuple(masks.shape[-2:]) != tuple(pixels.shape[-2:]):
        masks = F.resize(masks[:, None].to(torch.uint8), list(pixels.shape[-2:]),
                         interpolation=F.InterpolationMode.NEAREST)[:, 0].bool()
    return draw_segmentation_masks(pixels, masks, alpha=alpha,
                                   colors=[class_color(int(c)) for c in labels.tolist()])


def _enlarge(pixels: Tensor, boxes: Tensor, min_side: int) -> tuple[Tensor, Tensor]:
    """Scale up by the smallest integer factor that makes the short side >= ``min_side``."""
    factor = math.ceil(min_side / min(pixels.shape[-2:])) if min_side > 0 else 1
    if factor <= 1:
        return pixels, boxes
    height, width = pixels.shape[-2:]
    big = F.resize(pixels, [height * factor, width * factor],
                   interpolation=F.InterpolationMode.NEAREST)
    return big, boxes * factor


def _clamp(boxes: Tensor, height: int, width: int) -> Tensor:
    """Boxes inside the picture, so their outline is visible; x1 <= x2 and y1 <= y2 kept."""
    xs = boxes[:, 0::2].clamp(0, width - 1)
    ys = boxes[:, 1::2].clamp(0, height - 1)
    return torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)


def _caption(category_id: int, names: Mapping[int, str] | None, score: float | None) -> str:
    name = (names or {}).get(category_id, str(category_id))
    return name if score is None else f"{name} {score:.2f}"


def _title_height(titles: tuple[str, str] | None) -> int:
    if titles is None:
        return 0
    font = ImageFont.load_default()
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag" + "".join(titles),
                                                            font=font)
    return box[3] + 2 * _TITLE_PAD
