"""A small valid dataset in the canonical COCO layout, written by the tests themselves.

``write_coco_dataset(root)`` writes ``annotations/{train,val}.json`` and PNG images under
``images/{train,val}/``: every image 64x48 px with distinct pixels (so no content hash repeats
across splits) and two boxes of different categories inside it; every category has train boxes.
Tests copy it, break one thing and expect the suite to name it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

WIDTH, HEIGHT = 64, 48
CATEGORIES = ("circle", "square", "triangle")


def write_image(path: Path, index: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> None:
    """A PNG whose pixels depend on ``index`` (distinct files get distinct hashes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, ((index * 7) % 256, (index * 13) % 256, (index * 29) % 256))
    image.putpixel((index % size[0], 0), (255, 255, 255))
    image.save(path)


def coco_split(first_image_id: int, count: int, first_ann_id: int) -> dict[str, Any]:
    """COCO json dict for ``count`` images, ids from ``first_image_id``, two boxes each."""
    images, annotations = [], []
    for k in range(count):
        image_id = first_image_id + k
        images.append(
            {
                "id": image_id,
                "file_name": f"img_{image_id:03d}.png",
                "width": WIDTH,
                "height": HEIGHT,
            }
        )
        for j, (x, y, w, h) in enumerate([(4, 6, 20, 16), (30, 20, 25.5, 22)]):
            annotations.append(
                {
                    "id": first_ann_id + 2 * k + j,
                    "image_id": image_id,
                    "category_id": (image_id + j) % len(CATEGORIES) + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco_dataset(root: Path, n_train: int = 6, n_val: int = 3) -> Path:
    """Write the valid dataset under ``root`` and return ``root``."""
    splits = {
        "train": coco_split(1, n_train, 1),
        "val": coco_split(n_train + 1, n_val, 2 * n_train + 1),
    }
    for split, data in splits.items():
        save_split(root, split, data)
        for image in data["images"]:
            write_image(root / "images" / split / image["file_name"], image["id"])
    return root


def load_split(root: Path, split: str) -> dict[str, Any]:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def save_split(root: Path, split: str, data: dict[str, Any]) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"{split}.json").write_text(json.dumps(data))


@pytest.fixture(scope="session")
def pristine_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The valid dataset, written once per session; copy it before changing anything."""
    return write_coco_dataset(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def dataset(pristine_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the valid dataset, free to break."""
    return Path(shutil.copytree(pristine_dataset, tmp_path / "dataset"))
