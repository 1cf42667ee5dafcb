"""ONNX export of a DETR detector, checked against the eager model with ONNX Runtime.

::

    python -m detr.export CHECKPOINT --out model.onnx [--opset 18] [--height H --width W]
    python -m detr.export official:r50 --out detr-r50.onnx      # the official COCO weights

``CHECKPOINT``: as ``--model`` of :mod:`detr.predict` (a training checkpoint of this project,
or ``official[:VARIANT][:PATH]``).

The graph (:class:`DetectionGraph`): inputs ``images`` float32 [B, 3, H, W], normalised with
the ImageNet mean/std as :class:`detr.models.detr.DETR` takes them, and ``mask`` bool
[B, H, W], True on padding (bottom and right; all False for a batch of same-size images);
outputs ``pred_logits`` [B, Q, C + 1] (last = no object) and ``pred_boxes`` [B, Q, 4],
normalised (cx, cy, w, h) of each image's own, unpadded size, and, for a segmentation model
(its forward also returns ``pred_masks``), ``pred_masks`` [B, Q, H/4, W/4] mask logits on
the padded batch's stride-4 grid: the graph's outputs are those of :data:`KNOWN_OUTPUTS` that
the model returns, in that order. With ``--no-mask`` the graph
has no ``mask`` input and every image must fill the whole batch tensor. Batch size, height and
width are dynamic (height and width at least ``MIN_SIDE`` px) unless ``--static``, which fixes
them to ``--batch``, ``--height`` and ``--width``. The model's categories (ids and names),
the val resize (``scale``, ``max_size``) and the normalisation go into the ONNX metadata.

Why a graph module and not ``DETR.forward`` as it is: that forward looks at the mask to skip
the masking when nothing is padded (``bool(mask.any())``), a data-dependent branch that
``torch.export`` cannot trace; the graph takes one path for good (``padded=True``: masked,
exact with or without padding; ``--no-mask``: unmasked). The backbone's padding hooks use
fixed per-layer strides, so the masked path exports with dynamic image sizes, and SDPA is
exported as plain MatMul/Softmax (opset 18 has no attention operator).

Every export is checked before it is kept: ONNX Runtime (CPU) and the eager fp32 model run the
same inputs (the export's own shape and, when dynamic, other batch sizes, sizes and paddings);
the largest absolute differences of logits and boxes (and mask logits) are printed and must
stay within
``--atol``. The file is written next to ``--out`` and renamed onto it only when the check
passes: a failed export leaves an earlier file untouched. Exit status 0 on success, 1 when
the outputs differ beyond the tolerance, 2 for unusable input.

Needs the ``export`` extra (``pip install -e '.[export]'``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from detr.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_OPSET = 18
MIN_OPSET = 17
MIN_SIDE = 33  # px: below it the stride-32 feature map is a single cell, a shape torch.export
# specialises on (1 is special to broadcasting), which would make the graph's sizes static
DEFAULT_ATOL = 1e-3
INPUT_NAMES = ("images", "mask")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")  # a detector's graph outputs
KNOWN_OUTPUTS = (*OUTPUT_NAMES, "pred_masks")  # a segmentation model adds its mask logits


class ExportError(RuntimeError):
    """The model could not be exported, or the export does not match the eager model."""


class DetectionGraph(nn.Module):
    """The exported computation: ``(images, mask)`` -> ``(pred_logits, pred_boxes)`` of the
    last decoder layer (module doc for the contract), or the model's ``outputs`` in that
    order (:func:`graph_outputs`). ``with_mask=False``: ``forward(images)`` only, no padding
    allowed."""

    def __init__(self, model: nn.Module, *, with_mask: bool = True,
                 outputs: Sequence[str] = OUTPUT_NAMES):
        super().__init__()
        self.model = model
        self.with_mask = with_mask
        self.outputs = tuple(outputs)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
        if self.with_mask:
            out = self.model(images, mask, padded=True)
        else:
            padding = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool,
                                  device=images.device)
            out = self.model(images, padding, padded=False)
        return tuple(out[name] for name in self.outputs)


def graph_outputs(model: nn.Module, example: tuple[Tensor, Tensor]) -> tuple[str, ...]:
    """The names of :data:`KNOWN_OUTPUTS` that ``model`` returns on ``example`` (one eager
    pass)."""
    with torch.no_grad():
        out = model(*example)
    return tuple(name for name in KNOWN_OUTPUTS if name in out)


@dataclass(frozen=True)
class Check:
    """ONNX Runtime against eager on one input: its shape, whether it had padding, the largest
    absolute differences (``masks_diff``: of the mask logits; None for a detector)."""

    shape: tuple[int, int, int]
    padded: bool
    logits_diff: float
    boxes_diff: float
    masks_diff: float | None = None

    @property
    def max_diff(self) -> float:
        return max(self.logits_diff, self.boxes_diff, self.masks_diff or 0.0)

    def line(self, atol: float) -> str:
        b, h, w = self.shape
        verdict = "ok" if self.max_diff <= atol else "TOO LARGE"
        masks = "" if self.masks_diff is None else f"  masks {self.masks_diff:.2e}"
        return (f"  {b} x {h} x {w:<5} {'padded' if self.padded else 'full  '}  "
                f"logits {self.logits_diff:.2e}  boxes {self.boxes_diff:.2e}{masks}  {verdict}")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` did: the file, its opset, the time taken and the checks."""

    path: Path
    opset: int
    dynamic: bool
    with_mask: bool
    seconds: float
    checks: tuple[Check, ...]
    atol: float
    outputs: tuple[str, ...] = OUTPUT_NAMES

    @property
    def max_diff(self) -> float:
        return max(c.max_diff for c in self.checks)


def export(model: nn.Module, out: str | Path, *, opset: int = DEFAULT_OPSET,
           height: int = 800, width: int = 1066, batch_size: int = 2, with_mask: bool = True,
           dynamic: bool = True, atol: float = DEFAULT_ATOL,
           metadata: Mapping[str, str] | None = None) -> ExportResult:
    """Export ``model`` (a DETR, moved to the CPU in fp32 eval mode) to ONNX at ``out`` and
    check it against eager (module doc). ``height`` x ``width``, ``batch_size``: the example
    input (the fixed shape when not ``dynamic``); ``metadata``: extra ONNX metadata.

    Raises:
        ValueError: bad options.
        ExportError: the export failed, or ONNX Runtime differs from eager by more than
            ``atol`` (``out`` is then left as it was).
    """
    _check_options(opset, height, width, batch_size, atol, dynamic)
    model = model.float().eval().cpu()
    example = _example(batch_size, height, width, padded=with_mask and batch_size > 1)
    outputs = graph_outputs(model, example)
    graph = DetectionGraph(model, with_mask=with_mask, outputs=outputs).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(suffix=".onnx", prefix=f".{out.stem}-", dir=out.parent)
    os.close(handle)
    try:
        start = time.perf_counter()
        _export_to(graph, example, Path(temp), opset=opset, dynamic=dynamic,
                   metadata=metadata or {})
        seconds = time.perf_counter() - start
        cases = [example] + (_other_inputs(height, width, with_mask) if dynamic else [])
        checks = tuple(check_onnx(Path(temp), model, cases, with_mask=with_mask))
        result = ExportResult(out, opset, dynamic, with_mask, seconds, checks, atol, outputs)
        if result.max_diff > atol:
            raise ExportError(f"ONNX Runtime differs from eager by {result.max_diff:.2e} > "
                              f"atol {atol:g}:\n" + "\n".join(c.line(atol) for c in checks))
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp made it private; a model file is not
        os.replace(temp, out)
    finally:
        Path(temp).unlink(missing_ok=True)
    return result


def check_onnx(path: Path, model: nn.Module, cases: Sequence[tuple[Tensor, Tensor]], *,
               with_mask: bool = True) -> list[Check]:
    """Run the ONNX file (ONNX Runtime, CPU) and ``model`` (eager, its own ``forward``, which
    decides padding by itself) on each ``(images, mask)`` case; the largest differences of
    every graph output (``pred_masks`` too when the graph has it).

    Raises:
        ExportError: a graph output that the eager model does not return.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    checks = []
    for images, mask in cases:
        feeds = {"images": images.numpy()}
        if with_mask:
            feeds["mask"] = mask.numpy()
        got = dict(zip(names, session.run(names, feeds), strict=True))
        with torch.no_grad():
            eager = model(images, mask)
        missing = [name for name in names if name not in eager]
        if missing:
            raise ExportError(f"{path}: graph outputs {missing} that the model does not return")
        diff = {name: float((torch.from_numpy(got[name]) - eager[name]).abs().max())
                for name in names}
        checks.append(Check((images.shape[0], *images.shape[-2:]), bool(mask.any()),
                            diff["pred_logits"], diff["pred_boxes"], diff.get("pred_masks")))
    return checks


def _export_to(graph: DetectionGraph, example: tuple[Tensor, Tensor], path: Path, *,
               opset: int, dynamic: bool, metadata: Mapping[str, str]) -> None:
    """torch.export -> ONNX (the dynamo exporter) -> ``path``, at exactly ``opset``."""
    import onnx

    args = example if graph.with_mask else example[:1]
    names = INPUT_NAMES[:len(args)]
    shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1)
        height, width = torch.export.Dim("height", min=MIN_SIDE), torch.export.Dim(
            "width", min=MIN_SIDE)
        shapes = {"images": {0: batch, 2: height, 3: width},
                  "mask": {0: batch, 1: height, 2: width}}
        shapes = {name: shapes[name] for name in names}
    with torch.no_grad():
        graph(*args)  # eager once: the backbone finds its strides outside the trace
        try:
            with warnings.catch_warnings():  # images and mask share their Dims on purpose
                warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
                program = torch.onnx.export(graph, args, dynamo=True, opset_version=opset,
                                            input_names=list(names),
                                            output_names=list(graph.outputs),
                                            dynamic_shapes=shapes, verbose=False)
        except Exception as exc:  # the exporter raises many types; say which step failed
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    program.model.metadata_props.update(metadata)
    program.save(str(path))
    got = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False)
           .opset_import}.get("", None)
    if got != opset:
        raise ExportError(f"the exporter wrote opset {got}, not the requested {opset}")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _example(batch: int, height: int, width: int, *, padded: bool,
             seed: int = 0) -> tuple[Tensor, Tensor]:
    """A normalised-looking random batch and its mask; with ``padded``, the last image is
    smaller (about 3/4 of each side) and zero-padded, as :func:`pad_images` makes it."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    if padded:
        h, w = max(MIN_SIDE, height * 3 // 4), max(MIN_SIDE, width * 3 // 4)
        mask[-1, h:] = True
        mask[-1, :, w:] = True
        images[-1, :, h:] = 0
        images[-1, :, :, w:] = 0
    return images, mask


def _other_inputs(height: int, width: int, padded: bool) -> list[tuple[Tensor, Tensor]]:
    """Shapes other than the example's, to check the dynamic sizes: one image of odd size,
    three images of another aspect (the last one padded if ``padded``)."""
    return [_example(1, max(MIN_SIDE, height * 2 // 3 + 1), max(MIN_SIDE, width // 2 + 3),
                     padded=False, seed=1),
            _example(3, max(MIN_SIDE, width * 3 // 4), max(MIN_SIDE, height * 3 // 4 + 5),
                     padded=padded, seed=2)]


def _check_options(opset: int, height: int, width: int, batch_size: int, atol: float,
                   dynamic: bool) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is not supported: use {MIN_OPSET} or newer "
                         f"(default {DEFAULT_OPSET})")
    if min(height, width) < (MIN_SIDE if dynamic else 1):
        raise ValueError(f"height and width must be >= {MIN_SIDE} px, got {height} x {width}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if not atol > 0:
        raise ValueError(f"atol must be > 0, got {atol}")


def metadata_of(predictor) -> dict[str, str]:
    """ONNX metadata of a :class:`detr.inference.Predictor`: its categories, resize and the
    input normalisation (JSON values)."""
    ids = list(predictor.category_names)
    return {"categories": json.dumps([{"id": int(i), "name": predictor.category_names[i]}
                                      for i in ids]),
            "num_queries": str(predictor.model.num_queries),
            "val_resize": json.dumps({"scale": predictor.scale, "max_size": predictor.max_size}),
            "normalize": json.dumps({"mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
            "producer": "detr-ops (python -m detr.export)"}


def main(argv: list[str] | None = None) -> int:
    """``python -m detr.export`` (module doc)."""
    parser = argparse.ArgumentParser(prog="python -m detr.export",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="training checkpoint, or official[:VARIANT][:PATH]")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    parser.add_argument("--height", type=int, help="example height (default: the val scale)")
    parser.add_argument("--width", type=int, help="example width (default: 4/3 of the height, "
                                                  "at most the val max_size)")
    parser.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    parser.add_argument("--no-mask", action="store_true",
                        help="no mask input: every image fills the batch tensor")
    parser.add_argument("--static", action="store_true",
                        help="fix batch, height and width to the example's")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help=f"largest allowed |ONNX - eager| (default {DEFAULT_ATOL:g})")
    args = parser.parse_args(argv)
    from detr.predict import UsageError, load_predictor, parse_model

    try:
        predictor = load_predictor(parse_model(args.checkpoint), device="cpu", precision="fp32")
        height = args.height or predictor.scale
        width = args.width or min(predictor.max_size, round(height * 4 / 3))
        result = export(predictor.model, args.out, opset=args.opset, height=height,
                        width=width, batch_size=args.batch, with_mask=not args.no_mask,
                        dynamic=not args.static, atol=args.atol,
                        metadata=metadata_of(predictor))
    except (UsageError, ValueError, ImportError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    except ExportError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 1
    _print(result)
    return 0


def _print(result: ExportResult) -> None:
    size = result.path.stat().st_size / 2**20
    shape = "dynamic batch x height x width" if result.dynamic else "static shape"
    inputs = "images, mask" if result.with_mask else "images"
    print(f"exported {result.path} ({size:.1f} MiB, opset {result.opset}, {shape}; inputs: "
          f"{inputs}; outputs: {', '.join(result.outputs)}) in {result.seconds:.1f} s")
    print(f"ONNX Runtime vs eager (fp32, CPU), max |difference| (tolerance {result.atol:g}):")
    for check in result.checks:
        print(check.line(result.atol))


if __name__ == "__main__":
    sys.exit(main())
