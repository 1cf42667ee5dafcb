"""Tiled prediction on large images: AP on whole images vs AP on the tiles the model trained on.

    python -m benchmarks.tiled_prediction --image-size 2000 --tile 512 --num-train 40 \\
        --num-val 10 --max-objects 40 --epochs 12 --json tiled.json
    python -m benchmarks.tiled_prediction --tiny          # < 1 min: checks that it runs

1. A synthetic large-image set (:func:`detr.data.synthetic.generate`; ``--generate`` passes
   more of its keyword arguments as JSON, e.g. an object size range where it has one).
2. Tiled as the prepare stage tiles it (``prepare.tile``: :func:`pipelines.stages.prepare.
   tile_dataset`, ``min_image_side`` = the tile size).
3. A model trained on the tiles (:func:`detr.train.fit`, the model / loss / train sections of
   ``--params``; ``data.scales`` = ``[scale]``, ``data.max_size`` = scale; ``--scale``
   defaults to the tile size: tiles at their own resolution; on a CPU, half of it is ~4x
   cheaper per step).
4. The evaluate stage's measurement (:func:`pipelines.measurement.measure`) of the same
   checkpoint: on the val tiles (what training's val AP sees), on the whole val images resized
   to the scale (no tiling), and on the whole images with tiled prediction (``evaluate.tile``)
   merged by IoS, by IoU (NMS), with the whole image added, and with box fusion.

Prints one row per measurement (AP, AP50, AP small / medium / large, seconds) and writes them
with the settings to ``--json``. The acceptance of issue 20: tiled prediction on the whole
images reaches at least the AP on the tiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr.config import load_params  # noqa: E402
from detr.data.layout import whole_annotation_name  # noqa: E402
from detr.data.synthetic import generate  # noqa: E402
from detr.train import fit  # noqa: E402
from pipelines.measurement import measure  # noqa: E402
from pipelines.params import EvaluateConfig, EvaluateTileConfig, TileConfig  # noqa: E402
from pipelines.stages.prepare import tile_dataset  # noqa: E402

STATS = ("AP", "AP50", "AP_small", "AP_medium", "AP_large")
TINY = {"image_size": 256, "tile": 128, "num_train": 4, "num_val": 2, "max_objects": 6,
        "epochs": 1}


def build_data(work: Path, args) -> tuple[Path, Path]:
    """(tiled dataset, whole-image view of its val split) under ``work``."""
    tiled = work / "tiled"
    extra = json.loads(args.generate)  # "objects": [min, max] replaces --max-objects
    counts = {} if "objects" in extra else {"max_objects": args.max_objects}
    generate(tiled, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
             seed=args.seed, num_workers=args.workers, **counts, **extra)
    summary = tile_dataset(tiled, TileConfig(size=args.tile, overlap=args.overlap,
                                             min_image_side=args.tile,
                                             min_visible=args.min_visible))
    print(f"tiles: {summary['tiles']}, boxes on tiles: {summary['annotations']}")
    whole = work / "whole"
    (whole / "annotations").mkdir(parents=True)
    shutil.copy(tiled / "annotations" / whole_annotation_name("val"),
                whole / "annotations" / "val.json")
    (whole / "images").mkdir()
    (whole / "images" / "val").symlink_to((tiled / "images" / "val").resolve())
    return tiled, whole


def train(tiled: Path, out: Path, args) -> tuple[Path, dict]:
    """Train on the tiles; (best checkpoint, the configs used)."""
    cfg = load_params(args.params)
    scale = args.scale or args.tile
    data = dataclasses.replace(cfg["data"], scales=(scale,), max_size=scale, crop_scales=None,
                               num_workers=0)
    train_cfg = dataclasses.replace(cfg["train"], epochs=args.epochs, eval_every_steps=0,
                                    early_stop_patience=0, device=args.device, init_weights=None)
    start = time.perf_counter()
    result = fit(model_cfg=cfg["model"], loss_cfg=cfg["loss"], data_cfg=data,
                 train_cfg=train_cfg, data_root=tiled, out_dir=out, progress=False,
                 evaluate_at_end=False)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.0f} s")
    return result.checkpoint, {"data": data, "train": train_cfg}


def measurements(checkpoint: Path, tiled: Path, whole: Path, cfgs: dict, args) -> list[dict]:
    """One row per way of measuring the checkpoint (module doc, step 4)."""
    tile = EvaluateTileConfig(size=args.tile, overlap=args.overlap)
    ways = {
        "val tiles (as trained)": (tiled, None),
        "whole images, resized": (whole, None),
        "whole images, tiled, merge ios": (tiled, tile),
        "whole images, tiled, merge iou (NMS)": (tiled, dataclasses.replace(tile, match="iou")),
        "whole images, tiled + whole image": (tiled, dataclasses.replace(tile, whole=True)),
        "whole images, tiled, ios + fusion": (tiled, dataclasses.replace(tile, fuse=True)),
    }
    rows = []
    for name, (dataset, tiling) in ways.items():
        cfg = EvaluateConfig(batch_size=args.batch_size, tile=tiling)
        start = time.perf_counter()
        evaluation = measure(checkpoint, dataset, cfg=cfg, data_cfg=cfgs["data"],
                             train_cfg=cfgs["train"]).evaluation
        rows.append({"name": name, "images": evaluation.num_images,
                     **{k: evaluation.stats[k] for k in STATS},
                     "seconds": round(time.perf_counter() - start, 1)})
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'measured on':40s} {'images':>6s} " + " ".join(f"{k:>9s}" for k in STATS)
    lines = [head + f" {'seconds':>8s}", "-" * (len(head) + 9)]
    for r in rows:
        values = " ".join(f"{r[k]:9.3f}" for k in STATS)
        lines.append(f"{r['name']:40s} {r['images']:6d} {values} {r['seconds']:8.1f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tiled_prediction",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="model, loss and train sections")
    parser.add_argument("--image-size", type=int, default=2000)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--scale", type=int, default=None,
                        help="training and prediction scale of a tile (default: --tile)")
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--min-visible", type=float, default=0.5)
    parser.add_argument("--num-train", type=int, default=40)
    parser.add_argument("--num-val", type=int, default=10)
    parser.add_argument("--max-objects", type=int, default=40)
    parser.add_argument("--generate", default="{}",
                        help="more keyword arguments of detr.data.synthetic.generate, as JSON")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation: tiles a pass")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes drawing the images")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for data and checkpoint (default: a temporary one)")
    parser.add_argument("--tiny", action="store_true", help=f"a check that it runs: {TINY}")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parser().parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    with tempfile.TemporaryDirectory(prefix="tiled-bench-") as tmp:
        work = args.work or Path(tmp)
        tiled, whole = build_data(work, args)
        checkpoint, cfgs = train(tiled, work / "checkpoints", args)
        rows = measurements(checkpoint, tiled, whole, cfgs, args)
    print(table(rows))
    if args.json is not None:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
