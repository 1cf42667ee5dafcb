"""The ``prepare`` stage: the built-in demo data or the user's data -> the canonical layout.

Writes ``data/dataset/annotations/{train,val}.json`` and ``data/dataset/images/{train,val}/``
(images of an imported dataset are linked, not copied, unless ``prepare.link: copy``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from prefect import flow

from detr.data import formats, synthetic, voc, yolo
from pipelines import stage
from pipelines.params import PrepareConfig
from pipelines.stage import DATASET


def run(*, cfg: PrepareConfig, out_dir: Path = DATASET) -> dict:
    """Create ``out_dir`` from ``cfg.source``; returns ``{"images": {split: n},
    "annotations": {split: n}}``."""
    summary = _prepare(cfg, out_dir)
    counts = ", ".join(f"{split} {n} images / {summary['annotations'][split]} boxes"
                       for split, n in summary["images"].items())
    print(f"prepare: {cfg.source} -> {out_dir}: {counts}")
    return summary


def _prepare(cfg: PrepareConfig, out_dir: Path) -> dict:
    if out_dir.exists():  # DVC removes outputs first; a manual run replaces them too
        shutil.rmtree(out_dir)
    if cfg.source == "demo":
        d = cfg.demo
        made = synthetic.generate(out_dir, num_train=d.num_train, num_val=d.num_val,
                                  image_size=d.image_size, max_objects=d.max_objects,
                                  seed=d.seed, num_workers=2)["splits"]
        return {key: {split: made[split][key] for split in made}
                for key in ("images", "annotations")}
    source = Path(cfg.source)
    if not source.exists():
        raise FileNotFoundError(f"prepare.source: {source} does not exist")
    common = {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "link": cfg.link}
    if cfg.format == "voc":
        imported = voc.import_voc(out_dir, source, **common)
    elif cfg.format == "yolo":
        imported = yolo.import_yolo(out_dir, source, **common)
    else:
        imported = formats.import_coco(out_dir, _coco_sources(source, cfg), **common)
    return {"images": dict(imported.images), "annotations": dict(imported.annotations)}


def _coco_sources(source: Path, cfg: PrepareConfig) -> dict[str, tuple[Path, Path]]:
    if source.is_file():
        if cfg.image_dir is None:
            raise ValueError(f"prepare.image_dir: needed with a single COCO json ({source})")
        return {"all": (source, Path(cfg.image_dir))}
    return {split: (source / "annotations" / f"{split}.json", source / "images" / split)
            for split in ("train", "val")}


@flow(name="prepare", log_prints=True)
def prepare_flow(**kwargs) -> dict:
    return run(**kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines prepare")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=DATASET)
    args = parser.parse_args(argv)
    from pipelines.params import load

    cfg = load(args.params)["prepare"]
    try:
        stage.invoke(prepare_flow, run, cfg=cfg, out_dir=args.out)
    except (FileNotFoundError, ValueError, formats.FormatError) as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 2
    return 0
