"""Time and disk of bringing in a user's dataset with DVC, at scale; prints a table.

    python -m benchmarks.dataset_scale [--images 10000] [--setup hardlink,symlink:hardlink]
        [--setup reflink,copy:symlink] [--work DIR]

Generates ``--images`` synthetic images once (:mod:`detr.data.synthetic`, 64 px JPEG, 90%
train), then, for each ``--setup`` (DVC ``cache.type``:``prepare.link``), in a throwaway git +
DVC copy of this project: copies them to ``data/raw``, ``dvc add data/raw``, points ``prepare``
at it as the README says (``prepare.source`` + ``data/raw`` under the stage's deps) and times
``dvc repro prepare``, ``dvc repro validate`` and ``dvc status``.

Disk is real blocks (not apparent size), every inode counted once, in this order: the source
before ``dvc add``; what the DVC cache adds; what ``data/dataset`` adds; the annotations that
``prepare`` writes (in the cache or the dataset); ``extra``: what ``data/raw``, the cache and
``data/dataset`` hold beyond the source and the annotations; DVC's own state (hashes by inode,
its index: ~1 kB per file whatever the pipeline; the benchmark puts ``core.site_cache_dir``
in ``.dvc/tmp`` to count it). ``reflink,copy:symlink`` is how the project was before it set
``cache.type`` (DVC's default): on a file system without reflinks every image is stored three
times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from detr.data import synthetic
from tests.pipelines.project import (
    BIN,
    TINY_PARAMS,
    make_project,
    project_env,
    real_disk,
    sh,
    use_own_data,
)

IMAGE_SIZE = 64
DEFAULT_SETUPS = ("hardlink,symlink:hardlink", "reflink,copy:symlink")
STEPS = {"add": ["add", "data/raw"], "prepare": ["repro", "prepare"],
         "validate": ["repro", "validate"], "status": ["status"]}


def generate(root: Path, images: int, workers: int) -> None:
    """``images`` synthetic images in the canonical layout under ``root``."""
    n_val = max(1, images // 10)
    synthetic.generate(root, num_train=images - n_val, num_val=n_val, image_size=IMAGE_SIZE,
                       num_workers=workers)


def measure(work: Path, raw: Path, cache_type: str, link: str, workers: int) -> dict:
    """One project: its step times (s) and disk (bytes) with ``cache_type`` and
    ``prepare.link``."""
    root = work / f"{cache_type}-{link}".replace(",", "-")
    root.mkdir()
    env = project_env()
    params = {**TINY_PARAMS, "validate": {"workers": workers}}
    make_project(root, env, params=params)
    dvc = str(BIN / "dvc")
    sh([dvc, "config", "cache.type", cache_type], root, env)
    # DVC's state (file hashes by inode, its index) goes to /var/tmp/dvc by default: count it
    sh([dvc, "config", "--local", "core.site_cache_dir", str(root / ".dvc" / "tmp" / "site")],
       root, env)
    shutil.copytree(raw, root / "data" / "raw")
    before = real_disk([root / "data" / "raw"])[0]
    seconds = {}
    for step, args in STEPS.items():
        if step == "prepare":
            use_own_data(root, link=link)
        start = time.perf_counter()
        sh([dvc, *args], root, env, timeout=3600)
        seconds[step] = time.perf_counter() - start
    parts = real_disk([root / p for p in ("data/raw", ".dvc/cache", "data/dataset", ".dvc/tmp")])
    parts += real_disk([root / "data" / "dataset" / "annotations"])
    shutil.rmtree(root, ignore_errors=True)
    return {"cache_type": cache_type, "link": link, "seconds": seconds, "source": before,
            "disk": dict(zip(("raw", "cache", "dataset", "state", "annotations"), parts,
                             strict=True))}


def table(images: int, rows: list[dict]) -> str:
    """The results as a Markdown table (times in s, disk in MB)."""
    head = ("| cache.type:prepare.link | images | dvc add s | prepare s | validate s | status s "
            "| source MB | +cache | +data/dataset | (annotations) | extra | +DVC state |")
    lines = [head, "|" + "---|" * 12]
    for row in rows:
        s, d, mb = row["seconds"], row["disk"], 1e6
        extra = d["raw"] + d["cache"] + d["dataset"] - d["annotations"] - row["source"]
        lines.append(
            f"| {row['cache_type']}:{row['link']} | {images:,} | {s['add']:.1f} | "
            f"{s['prepare']:.1f} | {s['validate']:.1f} | {s['status']:.1f} | "
            f"{row['source'] / mb:.1f} | {d['cache'] / mb:.1f} | {d['dataset'] / mb:.1f} | "
            f"{d['annotations'] / mb:.1f} | {100 * extra / row['source']:+.0f}% | "
            f"{d['state'] / mb:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataset_scale")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--setup", action="append", help="CACHE_TYPE:LINK, DVC cache.type "
                        "and prepare.link to measure (repeat); default: the project's "
                        f"({DEFAULT_SETUPS[0]}) and the old one ({DEFAULT_SETUPS[1]})")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="where the temporary folder "
                        "of the projects goes (default: the system's); removed at the end")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    setups = [s.split(":") for s in args.setup or DEFAULT_SETUPS]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        generate(work / "generated", args.images, args.workers)
        print(f"generated {args.images:,} images in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        rows = []
        for cache_type, link in setups:
            rows.append(measure(work, work / "generated", cache_type, link, args.workers))
            print(table(args.images, rows[-1:]).splitlines()[-1], file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(args.images, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
