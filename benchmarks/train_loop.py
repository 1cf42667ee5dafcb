"""Whole-training-loop throughput: our ``detr.train`` loop against the official ``main.py`` loop.

    OMP_NUM_THREADS=1 python benchmarks/train_loop.py --device cpu --preset tiny \
        --official-workers 0             # ~10 s (on busy cores, more threads ran 20x slower)
    python benchmarks/train_loop.py --preset paper --official /work/official-detr \\
        --batch-size 2,8,16 --precision fp32,bf16 --json out.json                      # a GPU

Both loops read the same synthetic COCO-format JPEG files from disk (``detr.data.synthetic``;
``paper``: 640x480 images, COCO's usual size, resized by the paper's augmentation to a short
side of 480-800 px and a long side <= 1333), through a DataLoader with workers, augmentation,
Hungarian matching, the loss with aux layers, backward, clipping, the AdamW step and a per-step
logging callback. Ours: :class:`detr.data.coco.CocoDetection` + :func:`make_transforms` +
:func:`collate` + :func:`detr.engine.train_one_epoch` with a callback that appends each step's
metrics to a JSON-lines file (the pipeline's ``MlflowLogger`` batches the same values to
MLflow, which the GPU machine lacks). The official: its
``models.build_model``, ``datasets.build_dataset`` (on symlinks in its ``train2017`` layout),
``util.misc.collate_fn`` and ``engine.train_one_epoch`` from a checkout given by ``--official``
(the row is skipped without it), at its defaults: fp32, 2 loader workers, no pinned memory.
The official model has 91 classes (``dataset_file="coco"``), ours the dataset's 6.

Per row: images/s and seconds per step over ``--steps`` steps after ``--warmup`` steps (an
optimiser step post-hook on both loops); peak CUDA memory per image; mean GPU utilisation;
model FLOPs per image (``torch.utils.flop_counter`` on one forward + loss + backward of a
loader batch); MFU = FLOPs/image x images/s / the device's peak (``--peak-tflops``, or the
table in ``_loop_metrics.py``). GPU-only numbers are n/a on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _loop_metrics as metrics  # noqa: E402
from benchmarks._common import (  # noqa: E402
    MODEL_CONFIGS,
    device_name,
    import_official,
    official_args,
)
from detr import hub  # noqa: E402
from detr.config import LossConfig, ModelConfig, TrainConfig  # noqa: E402
from detr.data.batching import collate  # noqa: E402
from detr.data.coco import CocoDetection  # noqa: E402
from detr.data.synthetic import DESCRIPTION, generate  # noqa: E402
from detr.data.transforms import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    make_transforms,
    paper_defaults,
)
from detr.device import autocast  # noqa: E402
from detr.engine import to_device, train_one_epoch  # noqa: E402
from detr.models.criterion import build_criterion  # noqa: E402
from detr.optim import build_optimizer  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
    model: ModelConfig
    image_size: tuple[int, int]  # (H, W) of the generated JPEGs
    num_images: int
    transforms: dict  # make_transforms keywords: scales, max_size, crop_scales, crop_size


PRESETS = {
    "tiny": Preset(MODEL_CONFIGS["tiny"], (96, 128), 24,
                   {"scales": (64, 80, 96), "max_size": 160, "crop_scales": (64, 80),
                    "crop_size": (48, 80)}),
    "paper": Preset(MODEL_CONFIGS["r50"], (480, 640), 200, paper_defaults()),
}


@dataclasses.dataclass(frozen=True)
class Row:
    impl: str  # "official" | "ours"
    batch: int
    precision: str = "fp32"
    compile: bool = False

    @property
    def name(self) -> str:
        return f"{self.impl} {self.precision}{' compiled' if self.compile else ''}"


def dataset(root: Path, preset: Preset, workers: int) -> Path:
    """The synthetic dataset for ``preset`` under ``root``: reused when its train split has
    the preset's image count and size, else (re)generated.

    Raises:
        FileExistsError: ``root`` holds a dataset that is not the synthetic demo (never
            overwritten: pass another ``--data`` folder).
    """
    ann = root / "annotations" / "train.json"
    if ann.is_file():
        coco = json.loads(ann.read_text())
        if coco.get("info", {}).get("description") != DESCRIPTION:
            raise FileExistsError(f"--data {root}: holds a dataset that is not the synthetic "
                                  f"demo ({ann}); pass an empty or new folder")
        images = coco["images"]
        if len(images) == preset.num_images and (images[0]["height"], images[0]["width"]) == (
                preset.image_size):
            return root
    generate(root, num_train=preset.num_images, num_val=2, image_size=preset.image_size,
             num_workers=workers, overwrite=True)
    return root


def official_layout(root: Path) -> Path:
    """``root/official``: the official code's COCO layout (``train2017/``,
    ``annotations/instances_{train,val}2017.json``) as symlinks to the canonical files."""
    out = root / "official"
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    links = {out / "train2017": root / "images" / "train",
             out / "val2017": root / "images" / "val",
             out / "annotations" / "instances_train2017.json": root / "annotations" / "train.json",
             out / "annotations" / "instances_val2017.json": root / "annotations" / "val.json"}
    for link, target in links.items():
        if not link.is_symlink():
            link.symlink_to(target.resolve())
    return out


def _loader(ds, collate_fn, batch: int, batches: int, workers: int, pin: bool) -> DataLoader:
    """Exactly ``batches`` batches drawn with replacement (so any step count fits any dataset
    size), as :func:`detr.train._loader` otherwise builds it."""
    sampler = RandomSampler(ds, replacement=True, num_samples=batch * batches,
                            generator=torch.Generator().manual_seed(0))
    return DataLoader(ds, batch_sampler=BatchSampler(sampler, batch, drop_last=True),
                      collate_fn=collate_fn, num_workers=workers, pin_memory=pin)


def flop_batches(root: Path, preset: Preset, batch: int, count: int = 3) -> list[tuple]:
    """``count`` collated batches of our loader (fixed seed), on which both models' FLOPs
    are counted: the same pixels for both, averaged over several random scales."""
    ds = CocoDetection.from_root(root, "train",
                                 transforms=make_transforms("train", **preset.transforms))
    torch.manual_seed(1)  # the transforms draw from torch's global generator
    return list(_loader(ds, collate, batch, count, 0, False))


def _measure(optimizer, device, args, run_loop, flop_step, batches) -> dict:
    """Run the loop with the clocks on; then count FLOPs of a step on each of ``batches``
    (``flop_step(batch)``): their mean."""
    util = metrics.GpuUtilisation(device)
    syncs = metrics.SyncCounter(device if args.sync_debug else torch.device("cpu"))
    clock = metrics.StepClock(optimizer, device, warmup=args.warmup, steps=args.steps,
                              on_start=lambda: (metrics.peak_memory_start(device), util.start(),
                                                syncs.start()), on_stop=syncs.stop)
    with syncs:
        run_loop()
    seconds = clock.close()
    result = {"step_s": seconds, "gpu_util": util.stop(), "syncs": syncs.summary(args.steps),
              "peak_mem_mib": metrics.peak_memory_mib(device)}
    flops = [metrics.count_flops(lambda b=b: flop_step(b)) for b in batches]
    result["flops"] = sum(flops) / len(flops)
    optimizer.zero_grad(set_to_none=True)
    return result


def run_ours(root: Path, preset: Preset, row: Row, args, device: torch.device) -> dict:
    """Our loop: the pieces ``detr.train.fit`` uses, for warmup + steps optimiser steps."""
    torch.manual_seed(0)
    ds = CocoDetection.from_root(root, "train",
                                 transforms=make_transforms("train", **preset.transforms))
    cfg = dataclasses.replace(preset.model, num_classes=ds.num_classes)
    train_cfg = TrainConfig(batch_size=row.batch, precision=row.precision,
                            channels_last=args.channels_last)
    model = hub.build(cfg).to(device)
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion(cfg.num_classes, LossConfig(), model.aids).to(device)
    optimizer = build_optimizer(model, train_cfg)
    net = torch.compile(model, dynamic=True) if row.compile else model
    loader = _loader(ds, collate, row.batch, args.warmup + args.steps, args.workers,
                     device.type == "cuda")
    log = Path(args.tmp) / "metrics.jsonl"

    def callback(values: dict) -> None:  # one line per step: the logging's host-side work
        with log.open("a") as f:
            f.write(json.dumps(values) + "\n")

    def loop():
        train_one_epoch(net, criterion, loader, optimizer, device=device, epoch=0,
                        precision=row.precision, clip_max_norm=train_cfg.clip_max_norm,
                        channels_last=train_cfg.channels_last, callback=callback,
                        progress=False)

    def flop_step(batch):
        images, mask, targets = to_device(batch, device, train_cfg.channels_last)
        with autocast(device, row.precision):
            outputs = model(images, mask, targets)
        criterion.total(criterion(outputs, targets)).backward()

    return _measure(optimizer, device, args, loop, flop_step, flop_batches(root, preset, row.batch))


def _official_transforms(preset: Preset):
    """The official training augmentation with ``preset``'s scales (its datasets.transforms)."""
    import datasets.transforms as T  # the official package

    t = preset.transforms
    resize = T.RandomResize(list(t["scales"]), max_size=t["max_size"])
    crop = T.Compose([T.RandomResize(list(t["crop_scales"])), T.RandomSizeCrop(*t["crop_size"]),
                      resize])
    normalize = T.Compose([T.ToTensor(), T.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])
    return T.Compose([T.RandomHorizontalFlip(), T.RandomSelect(resize, crop), normalize])


def run_official(root: Path, preset: Preset, row: Row, args, device: torch.device) -> dict:
    """The official loop, built as its ``main.py`` builds it (model, criterion, AdamW with a
    backbone group, dataset, collate_fn) and run by its ``engine.train_one_epoch``."""
    import_official(args.official)
    import util.misc as utils
    from datasets import build_dataset
    from engine import train_one_epoch as official_train_one_epoch
    from models import build_model

    oargs = official_args(preset.model, device, coco_path=str(official_layout(root)),
                          batch_size=row.batch, num_workers=args.official_workers)
    torch.manual_seed(0)
    model, criterion, _ = build_model(oargs)
    model.to(device)
    param_dicts = [  # main.py's two groups
        {"params": [p for n, p in model.named_parameters()
                    if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
         "lr": oargs.lr_backbone}]
    optimizer = torch.optim.AdamW(param_dicts, lr=oargs.lr, weight_decay=oargs.weight_decay)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' index prints
        ds = build_dataset(image_set="train", args=oargs)
    if preset.transforms != paper_defaults():  # else its own make_coco_transforms("train")
        ds._transforms = _official_transforms(preset)
    loader = _loader(ds, utils.collate_fn, row.batch, args.warmup + args.steps,
                     oargs.num_workers, False)

    def loop():
        with contextlib.redirect_stdout(io.StringIO()):  # its MetricLogger's progress lines
            official_train_one_epoch(model, criterion, loader, optimizer, device, 0,
                                     oargs.clip_max_norm)

    def flop_step(batch):  # our batch as its NestedTensor (labels 0..5 are valid ids of 91)
        images, mask, targets = to_device(batch, device)
        losses = criterion(model(utils.NestedTensor(images, mask)), targets)
        sum(losses[k] * criterion.weight_dict[k] for k in losses
            if k in criterion.weight_dict).backward()

    return _measure(optimizer, device, args, loop, flop_step, flop_batches(root, preset, row.batch))


def rows(args) -> list[Row]:
    out = []
    for batch in args.batch_size:
        if args.official is not None:
            out.append(Row("official", batch))
        for precision in args.precision:
            out += [Row("ours", batch, precision, c) for c in ((False, True) if args.compile
                                                               else (False,))]
    return out


def summarise(row: Row, raw: dict, peak: float | None) -> dict:
    """The row's numbers as the table and the JSON give them."""
    img_s = row.batch / raw["step_s"]
    flops_img = raw["flops"] / row.batch
    mem = raw["peak_mem_mib"]
    return {**dataclasses.asdict(row), "name": row.name, "img_s": img_s,
            "step_ms": raw["step_s"] * 1e3, "gpu_util_pct": raw["gpu_util"],
            "peak_mem_mib_per_image": None if mem is None else mem / row.batch,
            "gflops_per_image": flops_img / 1e9, "peak_tflops": peak,
            "mfu_pct": None if peak is None else 100 * flops_img * img_s / (peak * 1e12),
            "syncs": raw["syncs"]}


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(results: list[dict]) -> None:
    official = {r["batch"]: r["img_s"] for r in results if r["impl"] == "official"}
    base = official.get(2)
    print(f"\n{'row':22} {'batch':>5} {'img/s':>8} {'step ms':>8} {'MiB/img':>8} {'GPU %':>6} "
          f"{'GFLOP/img':>9} {'MFU %':>6} {'x off b2':>8} {'x off =b':>8}")
    for r in results:
        same = official.get(r["batch"])
        print(f"{r['name']:22} {r['batch']:5d} {r['img_s']:8.2f} {r['step_ms']:8.1f} "
              f"{_fmt(r['peak_mem_mib_per_image'], '8.0f'):>8} "
              f"{_fmt(r['gpu_util_pct'], '6.0f'):>6} {r['gflops_per_image']:9.1f} "
              f"{_fmt(r['mfu_pct'], '6.1f'):>6} "
              f"{_fmt(base and r['img_s'] / base, '8.2f'):>8} "
              f"{_fmt(same and r['img_s'] / same, '8.2f'):>8}", flush=True)
    print("(x off b2: images/s over the official loop's at batch 2 fp32, its defaults; "
          "x off =b: over the official loop's at the same batch)")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                        help="tiny: resnet18 on 128x96 images (CPU, CI); paper: R50 at the "
                             "paper's scales")
    parser.add_argument("--backbone", default=None, help="override the preset's backbone")
    parser.add_argument("--batch-size", type=_ints, default=[2], help="e.g. 2,8,16")
    parser.add_argument("--precision", type=lambda s: s.split(","), default=["fp32"],
                        help="ours: fp32,bf16 (bf16 = autocast)")
    parser.add_argument("--compile", action="store_true",
                        help="also rows of ours under torch.compile(dynamic=True)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--workers", type=int, default=None,
                        help="our loader processes (default: min(8, cores - 1) on CUDA, 0 on CPU)")
    parser.add_argument("--official-workers", type=int, default=2,
                        help="the official loader's processes (main.py's default: 2)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset folder (generated or reused; default: a temp folder)")
    parser.add_argument("--official", type=Path, default=None,
                        help="a facebookresearch/detr checkout; without it no official rows")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for MFU (default: _loop_metrics.PEAK_TFLOPS)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA: count host-device syncs per step and where they happen "
                             "(set_sync_debug_mode; the warnings slow the timed steps)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.workers is None:
        args.workers = min(8, (os.cpu_count() or 2) - 1) if args.device.startswith("cuda") else 0
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    if args.backbone:
        preset = dataclasses.replace(preset, model=dataclasses.replace(preset.model,
                                                                       backbone=args.backbone))
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        root = dataset(args.data or Path(tmp) / "data", preset, max(args.workers, 1))
        print(f"{device_name(device)}; preset {args.preset} ({preset.model.backbone}, "
              f"{preset.num_images} JPEGs {preset.image_size[1]}x{preset.image_size[0]} at "
              f"{root}); {args.steps} timed steps after {args.warmup}; workers ours "
              f"{args.workers}, official {args.official_workers}", flush=True)
        results = []
        for row in rows(args):
            run = run_official if row.impl == "official" else run_ours
            raw = run(root, preset, row, args, device)
            peak = metrics.peak_tflops(device, row.precision, args.peak_tflops)
            results.append(summarise(row, raw, peak))
            print(f"  {row.name} batch {row.batch}: {results[-1]['img_s']:.2f} img/s",
                  flush=True)
            if raw["syncs"] is not None:
                print(f"  syncs per step {raw['syncs']['per_step']:.1f}, by site: "
                      f"{raw['syncs']['sites']}", flush=True)
            if args.json:  # after every row: a run stopped by a time limit keeps its rows
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"device": device_name(device),
                                                 "preset": args.preset, "rows": results},
                                                indent=2))
    print_table(results)
    return results


if __name__ == "__main__":
    main()
