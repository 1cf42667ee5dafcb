"""The generator's masks and stuff classes (instance and panoptic segmentation data)."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from detr.data.synthetic import generate, main
from detr.data.synthetic_stuff import MAX_STUFF


def _coco(root, split="train"):
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def _decode(ann):
    rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
    return mask_utils.decode(rle).astype(bool)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same scenes without masks, with masks, and with masks and three stuff classes."""
    roots = {name: tmp_path_factory.mktemp(name) for name in ("plain", "masks", "stuff")}
    kw = {"num_train": 6, "num_val": 2, "image_size": 96, "seed": 3, "num_workers": 1}
    generate(roots["plain"], **kw)
    generate(roots["masks"], masks=True, **kw)
    generate(roots["stuff"], masks=True, stuff=3, **kw)
    return roots


def test_masks_leave_the_images_as_they_were(sets):
    for split in ("train", "val"):
        for path in sorted((sets["plain"] / "images" / split).iterdir()):
            other = sets["masks"] / "images" / split / path.name
            assert path.read_bytes() == other.read_bytes()


def test_each_mask_is_the_visible_pixels_with_its_box_and_area(sets):
    coco = _coco(sets["masks"])
    plain = _coco(sets["plain"])
    assert len(coco["annotations"]) == len(plain["annotations"])
    for ann in coco["annotations"]:
        mask = _decode(ann)
        image = next(i for i in coco["images"] if i["id"] == ann["image_id"])
        assert mask.shape == (image["height"], image["width"])
        assert ann["area"] == mask.sum() > 0
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(),
                               ys.max() + 1 - ys.min()]
    # one image's objects never share a pixel (a later object hides what it covers)
    for image in coco["images"]:
        masks = [_decode(a) for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert (np.sum(masks, axis=0) <= 1).all()


def test_a_mask_covers_exactly_the_pixels_drawn_in_its_colour(tmp_path):
    """One object on a flat-ish scene: the pixels far from the background's colour (the
    object's) are its mask, up to JPEG and noise at the border."""
    generate(tmp_path, num_train=1, num_val=1, image_size=96, objects=(1, 1),
             object_sizes=(30, 40), masks=True, seed=5, num_workers=1, jpeg_quality=100)
    coco = _coco(tmp_path)
    mask = _decode(coco["annotations"][0])
    pixels = np.asarray(Image.open(tmp_path / "images" / "train" / "000000.jpg"), dtype=float)
    inside = pixels[mask].mean(axis=0)
    distance = np.linalg.norm(pixels - inside, axis=-1)
    close = distance < 40
    agree = (close == mask).mean()
    assert agree > 0.9, agree


def test_stuff_and_things_tile_the_image(sets):
    coco = _coco(sets["stuff"])
    stuff_ids = {c["id"] for c in coco["categories"] if c["isthing"] == 0}
    assert len(stuff_ids) == 3 and {c["isthing"] for c in coco["categories"]} == {0, 1}
    seen = set()
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        cover = np.sum([_decode(a) for a in anns], axis=0)
        assert (cover == 1).all()  # every pixel in exactly one segment: no void, no overlap
        stuff = [a["category_id"] for a in anns if a["category_id"] in stuff_ids]
        assert len(stuff) == len(set(stuff)) >= 1  # one segment per stuff class
        seen.update(stuff)
    assert seen == stuff_ids


def test_stuff_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match=f"stuff must be 0..{MAX_STUFF}"):
        generate(tmp_path, num_train=1, num_val=1, stuff=MAX_STUFF + 1)


def test_cli_flags(tmp_path, capsys):
    main(["--root", str(tmp_path), "--num-train", "2", "--num-val", "1", "--image-size", "64",
          "--masks", "--stuff", "2", "--workers", "1"])
    coco = _coco(tmp_path)
    assert all("segmentation" in a for a in coco["annotations"])
    assert coco["info"]["generator"]["stuff"] == 2 and coco["info"]["generator"]["masks"]


def test_the_params_range_of_stuff_is_the_generators():
    from detr.config import ConfigError
    from pipelines.params import DemoConfig

    DemoConfig(stuff=MAX_STUFF)
    with pytest.raises(ConfigError, match="prepare.demo.stuff"):
        DemoConfig(stuff=MAX_STUFF + 1)
