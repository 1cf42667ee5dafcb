"""Cost of multi-scale features (``model.feature_levels``) on the demo: seconds per training step.

    OMP_NUM_THREADS=1 python benchmarks/multiscale_cost.py            # the demo's params.yaml
    python benchmarks/multiscale_cost.py --batch 8 --rounds 5 --variants layer2:1,layer4:3

Each variant is the demo's ``model:`` section (params.yaml) with ``last_stage`` and
``feature_levels`` replaced (``STAGE:LEVELS``); the step is what the demo trains: forward with
its training aids (the dense head sees every level), the Hungarian loss with aux layers,
backward, clipping and the AdamW step, at the demo's precision (``auto``: bf16 autocast where fast) on a batch of random
128 px images with 3 boxes each (the demo: 6 classes, 30 queries). The variants take turns
(``--rounds`` rounds of ``--steps`` steps, after one warm-up step each), so a busy machine slows
them alike; the median step of each is printed with its ratio to the first variant. Numbers are
relative: the demo's training time is this ratio times the baseline's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr.config import load_params  # noqa: E402
from detr.device import autocast, resolve_precision  # noqa: E402
from detr.models.backbone import feature_stages, finest_stride  # noqa: E402
from detr.models.criterion import build_criterion  # noqa: E402
from detr.models.detr import build_model  # noqa: E402
from detr.optim import build_optimizer  # noqa: E402

DEFAULT_VARIANTS = "layer2:1,layer3:2,layer4:3,layer4:2,layer2:2"


def _step(model, criterion, optimizer, clip, images, mask, targets, device, precision) -> float:
    start = time.perf_counter()
    with autocast(device, precision):
        outputs = model(images, mask, targets)
    criterion.total(criterion(outputs, targets)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    params = load_params(args.params)
    base = dataclasses.replace(params["model"], num_classes=6, num_queries=30)
    device = torch.device("cpu")
    precision = resolve_precision(params["train"].precision, device)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last)
    mask = torch.zeros(args.batch, args.size, args.size, dtype=torch.bool)
    targets = [{"boxes": torch.rand(3, 4) * 0.3 + 0.2, "labels": torch.randint(0, 6, (3,))}
               for _ in range(args.batch)]
    runs = {}
    for variant in args.variants.split(","):
        stage, levels = variant.split(":")
        cfg = dataclasses.replace(base, last_stage=stage, feature_levels=int(levels))
        model = build_model(cfg).train().to(memory_format=torch.channels_last)
        criterion = build_criterion(cfg.num_classes, params["loss"], model.aids)
        optimizer = build_optimizer(model, params["train"])
        run = (model, criterion, optimizer, params["train"].clip_max_norm, images, mask, targets,
               device, precision)
        _step(*run)  # warm-up
        runs[variant] = (cfg, run, [])
    for _ in range(args.rounds):
        for _cfg, run, times in runs.values():
            times.extend(_step(*run) for _ in range(args.steps))
    print(f"batch {args.batch} x {args.size} px, {precision}, median of "
          f"{args.rounds * args.steps} steps each")
    baseline = None
    for variant, (cfg, _run, times) in runs.items():
        median = statistics.median(times)
        baseline = baseline or median
        stages = feature_stages(cfg.last_stage, cfg.feature_levels)
        strides = [finest_stride(cfg.last_stage, cfg.dilation, cfg.feature_levels - i)
                   for i in range(len(stages))]
        tokens = sum((-(-args.size // stride)) ** 2 for stride in strides)
        params_m = sum(p.numel() for p in runs[variant][1][0].parameters()) / 1e6
        print(f"  {variant:10} {'+'.join(stages):22} {tokens:5} tokens  {params_m:5.2f} M params"
              f"  {median:.3f} s/step  x{median / baseline:.2f}")


if __name__ == "__main__":
    main()
