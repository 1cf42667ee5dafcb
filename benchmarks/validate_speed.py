"""How long the ``validate`` stage takes on a large synthetic dataset; prints a table.

    python -m benchmarks.validate_speed [--images 10000] [--boxes-per-image 10] [--workers 2]

Writes a canonical COCO dataset of small PNG (or JPEG) images into a temporary folder, every
image distinct (its index is written into its pixels, so no content hash repeats across splits),
then times the stage's phases and the whole ``run``. Target: 10,000 images and 100,000 boxes in
under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from PIL import Image

SIZE = 64
NUM_CLASSES = 10


def write_dataset(root: Path, images: int, boxes_per_image: int, fmt: str) -> None:
    """``images`` images (90% train), each with ``boxes_per_image`` boxes inside it."""
    n_train = images * 9 // 10
    splits = {"train": range(1, n_train + 1), "val": range(n_train + 1, images + 1)}
    categories = [
        {"id": c + 1, "name": f"class_{c}", "supercategory": "object"} for c in range(NUM_CLASSES)
    ]
    for split, ids in splits.items():
        folder = root / "images" / split
        folder.mkdir(parents=True)
        records, annotations = [], []
        for image_id in ids:
            name = f"{image_id:06d}.{fmt}"
            _image(image_id).save(folder / name, **({"quality": 95} if fmt == "jpg" else {}))
            records.append({"id": image_id, "file_name": name, "width": SIZE, "height": SIZE})
            annotations += _boxes(image_id, boxes_per_image)
        coco = {"images": records, "annotations": annotations, "categories": categories}
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(coco))


def _image(index: int) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (index % 251, index % 241, index % 239))
    for k, byte in enumerate(index.to_bytes(4, "big")):  # unique pixels per index
        image.putpixel((k, 0), (byte, 255 - byte, byte))
    return image


def _boxes(image_id: int, count: int) -> list[dict]:
    boxes = []
    for k in range(count):
        x, y, w, h = (k * 5) % 40, (k * 3) % 40, 8 + k % 10, 6 + k % 12
        boxes.append(
            {
                "id": image_id * count + k,
                "image_id": image_id,
                "category_id": (image_id + k) % NUM_CLASSES + 1,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
        )
    return boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--boxes-per-image", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--format", choices=["png", "jpg"], default="png")
    args = parser.parse_args()

    rows = []
    start = time.perf_counter()
    import great_expectations  # noqa: F401  (timed apart: a fixed cost per process)

    from pipelines.params import ValidateConfig
    from pipelines.stages.validate import run
    from pipelines.validation.dataset_tables import load_tables
    from pipelines.validation.expectations import run_suites

    rows.append(("import great_expectations + prefect", time.perf_counter() - start))
    cfg = ValidateConfig(workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "dataset"
        seconds, _ = _timed(write_dataset, root, args.images, args.boxes_per_image, args.format)
        rows.append(("write dataset", seconds))
        seconds, tables = _timed(load_tables, root, workers=args.workers)
        rows.append((f"flatten + file checks ({args.workers} workers)", seconds))
        seconds, _ = _timed(run_suites, tables, cfg)
        rows.append(("GE suites (no Data Docs)", seconds))
        seconds, report = _timed(run, root, cfg, Path(tmp) / "reports")
        rows.append(("run(): the whole stage, Data Docs and JSON included", seconds))
    boxes = args.images * args.boxes_per_image
    print(
        f"\nvalidate: {args.images:,} images, {boxes:,} boxes, {args.format}, "
        f"{args.workers} workers; success={report.success}"
    )
    print(f"{'phase':<52} {'seconds':>8}")
    print("-" * 61)
    for name, seconds in rows:
        print(f"{name:<52} {seconds:8.2f}")


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


if __name__ == "__main__":
    main()
