"""Time the pipeline's compute stages for a params file: prepare (the demo), train, evaluate.

    python benchmarks/pipeline_time.py --params configs/gpu_demo.yaml --epochs 1 \\
        --num-train 512 --num-val 64 --json out.json

The library functions the stages call, without the MLOps packages (DVC, MLflow, Prefect,
Great Expectations), so it also runs on a machine that has only PyTorch (the device machine of
``benchmarks/gpu_session.sh``): prepare = :func:`detr.data.synthetic.generate` with the
params' ``prepare.demo`` (what the prepare stage calls for ``source: demo``); train + evaluate
= :func:`detr.train.fit` (COCOeval on val at the end). validate and register use no GPU and
are left out. ``--num-train``/``--num-val``/``--epochs`` shorten the run.

Prints and writes ``{"seconds": {"prepare", "train", "evaluate"}, "train_img_s", "steps",
"AP", "AP50", "loss_first", "loss_last", "device", "precision", "batch_size"}``; train time
runs from the start of :func:`fit` (model build included) to the last optimiser step,
evaluate from there to its return (checkpoint save included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detr.config import load_params, read_params  # noqa: E402
from detr.data.synthetic import generate  # noqa: E402
from detr.device import resolve_precision, select_device  # noqa: E402
from detr.settings import resolve_configs  # noqa: E402
from detr.train import fit  # noqa: E402


def prepare(params_path: Path, root: Path, args) -> float:
    """Generate the demo data as the prepare stage would; returns seconds."""
    demo = read_params(params_path).get("prepare", {}).get("demo", {})
    start = time.perf_counter()
    generate(root, num_train=args.num_train or demo.get("num_train", 2000),
             num_val=args.num_val or demo.get("num_val", 500),
             image_size=demo.get("image_size", 256), max_objects=demo.get("max_objects", 6),
             seed=demo.get("seed", 0), num_workers=args.workers, overwrite=True)
    return time.perf_counter() - start


def train_and_evaluate(params_path: Path, root: Path, out: Path, epochs: int | None) -> dict:
    cfg = load_params(params_path)
    train_cfg = cfg["train"] if epochs is None else dataclasses.replace(cfg["train"],
                                                                        epochs=epochs, steps=None)
    device = select_device(train_cfg.device)
    model_cfg, data_cfg, train_cfg, _ = resolve_configs(  # params.yaml's auto, as train does
        cfg["model"], cfg["data"], train_cfg, root, device=device.type)
    steps: list[tuple[float, float]] = []  # (time, loss) per optimiser step

    def callback(values: dict) -> None:
        if "loss" in values and "step" in values:
            steps.append((time.perf_counter(), values["loss"]))

    start = time.perf_counter()
    result = fit(model_cfg=model_cfg, loss_cfg=cfg["loss"], data_cfg=data_cfg,
                 train_cfg=train_cfg, data_root=root, out_dir=out, callback=callback,
                 progress=False)
    end = time.perf_counter()
    if not steps:
        raise RuntimeError(f"{params_path}: training ran no optimiser step")
    stats = result.evaluation.stats if result.evaluation else {}
    print(result.evaluation.table if result.evaluation else "no evaluation")
    return {"seconds": {"train": steps[-1][0] - start, "evaluate": end - steps[-1][0]},
            "steps": len(steps), "train_img_s": len(steps) * train_cfg.batch_size
            * train_cfg.grad_accum / (steps[-1][0] - start),
            "loss_first": steps[0][1], "loss_last": steps[-1][1],
            "AP": stats.get("AP"), "AP50": stats.get("AP50"), "epochs": train_cfg.epochs,
            "batch_size": train_cfg.batch_size, "device": str(device),
            "precision": resolve_precision(train_cfg.precision, device)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("configs/gpu_demo.yaml"))
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--num-train", type=int, default=None,
                        help="override prepare.demo.num_train")
    parser.add_argument("--num-val", type=int, default=None, help="override prepare.demo.num_val")
    parser.add_argument("--workers", type=int, default=2, help="processes drawing the images")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        seconds = {"prepare": prepare(args.params, Path(tmp) / "data", args)}
        print(f"prepare: {seconds['prepare']:.1f} s", flush=True)
        out = train_and_evaluate(args.params, Path(tmp) / "data", Path(tmp) / "ckpt",
                                 args.epochs)
    out["seconds"] = {**seconds, **out["seconds"]}
    out["params"] = str(args.params)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
