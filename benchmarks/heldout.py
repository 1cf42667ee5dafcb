"""Held-out synthetic sets the defaults were not tuned on: `dvc repro` on each; prints a table.

    python -m benchmarks.heldout [--sets A,B] [--work DIR] [--keep] [--json PATH]
        [--set train.epochs=1 ...] [--subset 0.05]

The sets (:data:`SETS`, made by :func:`detr.data.synthetic.generate`):

- ``A``: 60 train + 20 val images of 640 px, 20-40 objects of 8-40 px (sqrt of the box
  area) per image, the demo's cluttered backgrounds, six classes: many small objects;
- ``B``: 2,000 train + 500 val images of 256 px, textured backgrounds, five classes, 1-8
  objects of 10-140 px.

For each set, in a throwaway git copy of this checkout (its tracked and not-ignored files,
:func:`tests.pipelines.project.make_project`), as the README's "Bring your own data" says: the
set in ``data/raw`` (hard links), ``prepare.source: data/raw`` in ``params.yaml`` and
``data/raw`` under the prepare stage's ``deps:`` in ``dvc.yaml``; nothing else changes unless
``--set`` says so. Then one ``dvc repro``, with MLflow on a SQLite store in the copy and no
servers (the variables that would point elsewhere, ``MLFLOW_*``, ``PREFECT_API*``, ``DVC_*``,
are dropped; ``OMP_NUM_THREADS`` is passed on only when set here). Each stage's time runs from
its "Running stage" line to the next one (the last: to the end of ``dvc repro``); the AP comes
from the copy's ``metrics/coco.json``.

Prints a Markdown table (set, images, size, objects, AP, AP50, AP small, train s, total s) and
writes the rows as JSON (``--json``, default ``benchmarks/results/heldout.json``): per set the
generator's settings and summary, the stage times, the 12 COCO statistics, or ``error`` (the
stage that failed and the end of its output). ``--set section.key=value`` (YAML values, e.g.
``--set train.epochs=1 --set 'data.scales=[128]'``) and ``--subset F`` (F x each split's
images) shorten a smoke run; the numbers in the README come from a run without them.

Generated sets stay in ``--work`` (default: a temporary folder) under ``data/<set>`` and are
reused when their settings match; the project copies are removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from detr.data import synthetic
from tests.pipelines.project import BIN, ROOT, make_project, project_env, use_own_data

SETS: dict[str, dict] = {
    "A": {"num_train": 60, "num_val": 20, "image_size": 640, "objects": (20, 40),
          "object_sizes": (8, 40), "background": "clutter", "seed": 1},
    "B": {"num_train": 2000, "num_val": 500, "image_size": 256, "objects": (1, 8),
          "object_sizes": (10, 140), "background": "texture", "classes": 5, "seed": 2},
}
SOURCE = "data/raw"  # where the set goes in the copy, as in the README
MARK = "Running stage '"


def settings(name: str, subset: float) -> dict:
    """Generator keyword arguments of set ``name``, with ``subset`` x its image counts."""
    kwargs = dict(SETS[name])
    kwargs["num_train"] = max(2, round(kwargs["num_train"] * subset))
    kwargs["num_val"] = max(1, round(kwargs["num_val"] * subset))
    return kwargs


def dataset(folder: Path, kwargs: dict, workers: int) -> dict:
    """The set ``kwargs`` under ``folder``: generated, or reused when ``folder/summary.json``
    says it was made with the same ``kwargs``. Returns the generator's summary."""
    record = folder / "summary.json"
    wanted = json.loads(json.dumps(kwargs))  # tuples as lists, as read back
    if record.exists():
        saved = json.loads(record.read_text())
        if saved["settings"] == wanted:
            return saved["summary"]
    summary = synthetic.generate(folder, num_workers=workers, overwrite=True, **kwargs)
    record.write_text(json.dumps({"settings": wanted, "summary": summary}, indent=1))
    return summary


def set_param(params: dict, dotted: str, value: object) -> None:
    """``params[a][b][c] = value`` for ``dotted`` "a.b.c"; the key must exist in the file.

    Raises:
        KeyError: a part of ``dotted`` is not in ``params.yaml`` (named).
    """
    *path, last = dotted.split(".")
    node = params
    for depth, key in enumerate([*path, last]):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"--set {dotted}: params.yaml has no "
                           f"{'.'.join([*path, last][:depth + 1])}")
        if depth < len(path):
            node = node[key]
    node[last] = value


def make_copy(root: Path, data: Path, overrides: dict, env: dict) -> None:
    """The project copy at ``root`` with the set ``data`` in it as the user's data."""
    root.mkdir(parents=True)
    make_project(root, env, params={})
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in overrides.items():
        set_param(params, key, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(data, root / SOURCE, copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("summary.json"))
    use_own_data(root, SOURCE)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def repro(root: Path, env: dict, log: Path) -> dict:
    """``dvc repro`` in ``root``, its output to ``log``; returns ``{"returncode", "seconds":
    {stage: s, "total": s}, "tail": last lines}``."""
    starts: list[tuple[str, float]] = []
    lines: list[str] = []
    start = time.perf_counter()
    with log.open("w") as out, subprocess.Popen(
            [str(BIN / "dvc"), "repro"], cwd=root, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            out.write(line)
            lines = [*lines[-59:], line.rstrip()]
            if MARK in line:
                stage = line.split(MARK, 1)[1].split("'", 1)[0]
                starts.append((stage, time.perf_counter()))
                print(f"  {time.perf_counter() - start:6.0f} s  {stage}", file=sys.stderr)
    end = time.perf_counter()
    ends = [t for _, t in starts[1:]] + [end]
    seconds = {stage: round(e - s, 1) for (stage, s), e in zip(starts, ends, strict=True)}
    return {"returncode": proc.returncode, "seconds": {**seconds, "total": round(end - start, 1)},
            "tail": lines}


def run_set(name: str, work: Path, args: argparse.Namespace, overrides: dict) -> dict:
    """Generate set ``name``, run the pipeline on it in a copy; returns its row."""
    kwargs = settings(name, args.subset)
    started = time.perf_counter()
    summary = dataset(work / "data" / name, kwargs, args.workers)
    row = {"set": name, "generator": json.loads(json.dumps(kwargs)), "summary": summary,
           "generate_s": round(time.perf_counter() - started, 1), "overrides": overrides}
    env = project_env()
    env.pop("OMP_NUM_THREADS", None)
    if "OMP_NUM_THREADS" in os.environ:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    root = work / f"project-{name}"
    if root.exists():
        shutil.rmtree(root)
    make_copy(root, work / "data" / name, overrides, env)
    print(f"set {name}: dvc repro in {root}", file=sys.stderr)
    done = repro(root, env, work / f"repro-{name}.log")
    row["seconds"] = done["seconds"]
    if done["returncode"] != 0:
        failed = list(done["seconds"])[-2] if len(done["seconds"]) > 1 else "dvc"
        row["error"] = {"stage": failed, "tail": done["tail"][-25:]}
    else:
        row["metrics"] = json.loads((root / "metrics" / "coco.json").read_text())
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return row


def _objects(summary: dict) -> str:
    """"20-40 / image, 8.9-40.0 px" over both splits."""
    splits = summary["splits"].values()
    per = [s["objects_per_image"] for s in splits if s["images"]]
    side = [s["box_side_px"] for s in splits if s["annotations"]]
    return (f"{min(p[0] for p in per)}-{max(p[1] for p in per)} / image, "
            f"{min(s[0] for s in side):.0f}-{max(s[1] for s in side):.0f} px")


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (times in s; a failed set shows the stage that failed)."""
    lines = ["| set | images (train + val) | size px | objects | AP | AP50 | AP small | "
             "train s | total s |", "|" + "---|" * 9]
    for row in rows:
        splits, s = row["summary"]["splits"], row["seconds"]
        size = "x".join(map(str, row["summary"]["image_size"]))
        if "metrics" in row:
            m = row["metrics"]
            ap = f"{m['AP']:.3f} | {m['AP50']:.3f} | {m['AP_small']:.3f}"
        else:
            ap = f"failed: {row['error']['stage']} | | "
        lines.append(f"| {row['set']} | {splits['train']['images']:,} + "
                     f"{splits['val']['images']:,} | {size} | {_objects(row['summary'])} | "
                     f"{ap} | {_seconds(s, 'train')} | {_seconds(s, 'total')} |")
    return "\n".join(lines)


def _seconds(seconds: dict, key: str) -> str:
    return f"{seconds[key]:.0f}" if key in seconds else "-"


def _overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected section.key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _commit() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heldout",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="A,B", help="comma-separated, of " + ",".join(SETS))
    parser.add_argument("--work", type=Path, default=None, help="where the sets and the "
                        "project copies go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="leave the project copies (and "
                        "a temporary --work) in place")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="a params.yaml value for the copies (smoke "
                        "runs only), e.g. train.epochs=1; repeat")
    parser.add_argument("--subset", type=float, default=1.0, help="F x each split's images "
                        "(smoke runs only)")
    parser.add_argument("--workers", type=int, default=2, help="processes drawing the images")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/heldout.json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.sets.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown or not names:
        parser.error(f"--sets {args.sets}: {unknown or 'none'} not among {', '.join(SETS)}")
    overrides = _overrides(args.overrides)
    work = args.work or Path(tempfile.mkdtemp(prefix="heldout-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", file=sys.stderr)
    try:
        rows = [run_set(name, work, args, overrides) for name in names]
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "subset": args.subset, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
