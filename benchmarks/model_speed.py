"""Training-step and inference throughput of DETR (images/s), printed as one table.

    python benchmarks/model_speed.py                       # tiny and R50 800x1066, batch 2
    python benchmarks/model_speed.py --official ~/detr     # + the official code, side by side

Rows: our model in fp32 (the official release's precision), our model with the fast path this
device supports (bf16 autocast, channels_last), and, with ``--official PATH`` (a checkout of
facebookresearch/detr), the official model built with the same config and loaded with the same
weights (the state-dict keys are identical), after checking both give the same outputs.
A training step = forward + Hungarian loss with aux layers + backward + clip + AdamW step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    MODEL_CONFIGS,
    device_name,
    import_official,
    official_args,
)
from detr.config import LossConfig, ModelConfig  # noqa: E402
from detr.device import autocast, bf16_supported  # noqa: E402
from detr.models.backbone import fold_batchnorm  # noqa: E402
from detr.models.criterion import build_criterion  # noqa: E402
from detr.models.detr import build_model  # noqa: E402

# (model config, image size, batch)
CONFIGS = {"tiny": (MODEL_CONFIGS["tiny"], (256, 256), 8),
           "r50": (MODEL_CONFIGS["r50"], (800, 1066), 2)}


def make_batch(cfg: ModelConfig, size: tuple[int, int], batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g).to(device)
    targets = []
    for _ in range(batch):
        n = 7
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.2 + 0.05
        targets.append({"labels": torch.randint(0, cfg.num_classes, (n,), generator=g).to(device),
                        "boxes": torch.cat([cxcy, wh], 1).to(device)})
    return images, targets


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(model, loss_fn, images, targets, *, bf16: bool, channels_last: bool, steps: int,
            warmup: int, device: torch.device, fold: bool = False) -> tuple[float, float]:
    """(training images/s, inference images/s); ``fold``: infer with the BatchNorms folded
    into the convolutions, as :class:`detr.inference.Predictor` does."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)  # in place: set it both ways, rounds alternate
    images = images.contiguous(memory_format=layout)
    precision = "bf16" if bf16 else "fp32"
    params = [p for p in model.parameters() if p.requires_grad]
    # lr 0: the same kernels, but the weights stay put (hundreds of steps on one batch of noise
    # at lr 1e-5 diverged to NaN on an H200)
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=1e-4)

    def train_step():
        with autocast(device, precision):
            loss = loss_fn(model(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()

    def infer():
        with torch.inference_mode(), autocast(device, precision):
            net(images)

    model.train()
    t_train = timed(train_step, steps, warmup, device)
    model.eval()
    net = fold_batchnorm(model) if fold else model
    t_infer = timed(infer, steps, warmup, device)
    return len(images) / t_train, len(images) / t_infer


def official_model(repo: Path, cfg: ModelConfig, device: torch.device):
    """Build the official DETR with ``cfg`` from a checkout at ``repo`` (no downloads)."""
    import_official(repo)
    from models.detr import build  # the official package, from the checkout

    loss = LossConfig()
    args = official_args(cfg, device)
    model, criterion, _ = build(args)
    if cfg.num_classes != 91:  # build() fixes 91 classes for dataset_file="coco"
        from models.detr import SetCriterion

        model.class_embed = torch.nn.Linear(cfg.hidden_dim, cfg.num_classes + 1)
        criterion = SetCriterion(cfg.num_classes, criterion.matcher, criterion.weight_dict,
                                 loss.eos_coef, criterion.losses).to(device)

    def loss_fn(outputs, targets):
        losses = criterion(outputs, targets)
        return sum(losses[k] * criterion.weight_dict[k] for k in losses
                   if k in criterion.weight_dict)

    return model.to(device), loss_fn


def run_config(name: str, args, device: torch.device) -> dict[str, list[tuple]]:
    """{variant: [(train img/s, infer img/s) per round]}; the variants take turns in each
    round, so slow drifts of the device (clocks, temperature, other jobs) hit them alike."""
    cfg, size, batch = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    criterion = build_criterion(cfg.num_classes, LossConfig(), model.aids).to(device)
    images, targets = make_batch(cfg, size, batch, device)
    ours_loss = lambda out, tgt: criterion.total(criterion(out, tgt))  # noqa: E731
    # (variant, model, loss, bf16, channels_last, cudnn.benchmark, folded BN for inference)
    variants = []
    if args.official is not None:
        ref, ref_loss = official_model(args.official, cfg, device)
        ref.load_state_dict(model.state_dict())
        with torch.no_grad():
            diff = (ref.eval()(images)["pred_boxes"] - model.eval()(images)["pred_boxes"]).abs()
        print(f"[{name}] max |official - ours| on pred_boxes: {diff.max().item():.2e}")
        variants.append(("official fp32", ref, ref_loss, False, False, False, False))
    variants.append(("ours fp32", model, ours_loss, False, False, False, False))
    # channels_last changes memory layout only, not numerics: still the official config.
    variants.append(("ours fp32+channels_last", model, ours_loss, False, True, False, False))
    # Inference as the Predictor runs it: BatchNorm folded into the convolutions.
    variants.append(("ours fp32+CL+folded BN", model, ours_loss, False, True, False, True))
    if bf16_supported(device):
        variants.append(("ours bf16+channels_last", model, ours_loss, True, True, False, False))
    if device.type == "cuda":
        # cuDNN's autotuner (off by default, and in the official code): both sides again.
        if args.official is not None:
            variants.append(("official fp32 +cudnn.bench", ref, ref_loss, False, False, True, False))
        variants.append(("ours fp32+CL +cudnn.bench", model, ours_loss, False, True, True, False))
        variants.append(("ours fp32+CL+fold +cudnn.bench", model, ours_loss, False, True, True,
                         True))
        variants.append(("ours bf16+CL +cudnn.bench", model, ours_loss, True, True, True, False))
    results: dict[str, list[tuple]] = {v[0]: [] for v in variants}
    kw = {"steps": args.steps, "warmup": args.warmup, "device": device}
    for _ in range(args.repeats):
        for variant, net, loss_fn, bf16, channels_last, bench, fold in variants:
            torch.backends.cudnn.benchmark = bench
            results[variant].append(measure(net, loss_fn, images, targets, bf16=bf16,
                                            channels_last=channels_last, fold=fold, **kw))
    torch.backends.cudnn.benchmark = False
    return results


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,r50")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of all variants; the table gives medians over rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--official", type=Path, default=None,
                        help="path of a facebookresearch/detr checkout to compare against")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(device_name(device))
    print(f"{args.steps} timed steps after {args.warmup} warm-up, {args.repeats} round(s)")
    print(f"\n{'config':6} {'variant':26} {'train img/s':>12} {'infer img/s':>12} "
          f"{'train x':>8} {'infer x':>8}  x range over rounds (train; infer)")
    for cfg in args.configs.split(","):
        results = run_config(cfg, args, device)
        base = next(iter(results.values()))
        for variant, rounds in results.items():
            train, infer = (_median([r[i] for r in rounds]) for i in (0, 1))
            rel = [(r[0] / b[0], r[1] / b[1]) for r, b in zip(rounds, base, strict=True)]
            spread = "; ".join(f"{min(x[i] for x in rel):.2f}-{max(x[i] for x in rel):.2f}"
                               for i in (0, 1))
            print(f"{cfg:6} {variant:26} {train:12.2f} {infer:12.2f} "
                  f"{train / _median([b[0] for b in base]):8.2f} "
                  f"{infer / _median([b[1] for b in base]):8.2f}  {spread}", flush=True)
    print("\n(x = relative to the first row of the config: the official code when given; "
          "the range compares each round with the same round's first row)")

if __name__ == "__main__":
    main()
