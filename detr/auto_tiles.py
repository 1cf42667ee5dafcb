"""``prepare.tile: auto``: whether a dataset's images are cut into tiles, and how large.

The same rule as ``data.scales: auto`` (:mod:`detr.settings`): the objects need a scale at
which the median one spans a few feature cells; when the whole images at that scale exceed
the device's pixel budget, tiles of the source are cut instead, sized so that a tile at that
scale fits the budget (:func:`tile_rule`). The tiles overlap by :data:`TILE_OVERLAP` of a
tile, and a box cut by a border stays in a tile when :data:`TILE_MIN_VISIBLE` of it is inside.
"""

from __future__ import annotations

from detr.data.profile import DatasetProfile
from detr.settings import MEDIAN_CELLS, MIN_SIDE, object_scale, short_side_cap

TILE_OVERLAP, TILE_MIN_VISIBLE = 0.2, 0.5
TILE_MAX_FRACTION = 0.75  # tiles larger than this part of the image: cap the scale instead


def tile_rule(profile: DatasetProfile, *, last_stage: str = "layer4", dilation: bool = False,
              feature_levels: int = 1, device: str = "cpu") -> tuple[int | None, str]:
    """``prepare.tile: auto``: the tile side (source px) when the images are too large for
    the scale their objects need within the device's budget (see the module doc: the same
    rule as ``data.scales``), else None. Tiles of that side, at that scale, fit the budget, so
    the objects keep the cells they need instead of being shrunk with the whole image.
    Returns ``(size or None, why)``."""
    from detr.models.backbone import finest_stride

    if profile.object_size_median is None:
        return None, "no boxes in the training split: no tiles"
    stride = finest_stride(last_stage, dilation, feature_levels)
    factor = object_scale(profile, stride)
    device = "cuda" if device.startswith("cuda") else "cpu"
    cap = short_side_cap(profile, device)
    need = factor * profile.short_side
    why = (f"the objects need a short side of {need:.0f} px (median {profile.object_size_median:.0f}"
           f" px -> {MEDIAN_CELLS:g} cells at stride {stride}), the {device} budget allows {cap}")
    if need <= cap:
        return None, why + ": whole images, no tiles"
    size = max(MIN_SIDE, int(cap / factor) // 32 * 32)
    if size > TILE_MAX_FRACTION * profile.short_side:
        return None, why + ": tiles would be nearly whole images, no tiles (data.scales caps)"
    return size, why + f": tiles of {size} px (x {factor:.2f} = {size * factor:.0f} px)"
