"""The ``prepare`` stage: the built-in demo data or the user's data -> the canonical layout.

Writes ``data/dataset/annotations/{train,val}.json`` and ``data/dataset/images/{train,val}/``.
Images of an imported dataset are linked, not copied (``prepare.link``; default ``hardlink``:
with the project's DVC ``cache.type: hardlink,symlink`` the source, the DVC cache and
``data/dataset`` then share one copy of each image, README "Disk and scale"). A user's source
is recognised by :func:`detr.data.detect_layout.detect_layout`
(``prepare.format: auto``) or read as the format named; the layout found is printed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from prefect import flow

from detr.data import formats, synthetic
from detr.data.detect_layout import detect_layout, import_layout
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
    layout = None
    if cfg.source != "demo":  # before removing out_dir: an unusable source changes nothing
        layout = detect_layout(cfg.source, format=cfg.format, image_dir=cfg.image_dir)
        print(f"prepare: found {layout.describe()}")
        for note in layout.notes:
            print(f"prepare: note: {note}")
    if out_dir.exists():  # DVC removes outputs first; a manual run replaces them too
        shutil.rmtree(out_dir)
    if layout is None:
        d = cfg.demo
        made = synthetic.generate(out_dir, num_train=d.num_train, num_val=d.num_val,
                                  image_size=d.image_size, max_objects=d.max_objects,
                                  seed=d.seed, num_workers=2)["splits"]
        return {key: {split: made[split][key] for split in made}
                for key in ("images", "annotations")}
    imported = import_layout(layout, out_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                             link=cfg.link)
    return {"images": dict(imported.images), "annotations": dict(imported.annotations)}


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
    except (OSError, ValueError, formats.FormatError) as exc:  # OSError: a link across disks
        print(f"prepare: {exc}", file=sys.stderr)
        return 2
    return 0
