"""Attention forward + backward on the CPU: bf16 vs fp32 inputs to SDPA, at the demo's shapes.

    python benchmarks/cpu_attention.py

Under bf16 autocast the projections give bf16 q/k/v; this shows what SDPA costs on them and on
the same tensors in fp32, which is why ``detr.models.transformer.Attention`` attends in fp32 on
the CPU (the rest of the model stays in bf16). Milliseconds per call (median of 20), one row
per shape [batch, heads, queries, keys, head dim].
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

SHAPES = {  # the demo: d=128, 8 heads, stride-8 tokens of a 128 px image, 30 queries, batch 8
    "encoder self-attention": (8, 8, 256, 256, 16),
    "decoder cross-attention": (8, 8, 30, 256, 16),
    "decoder self-attention": (8, 8, 30, 30, 16),
}


def time_call(shape: tuple[int, ...], dtype: torch.dtype, repeats: int) -> float:
    b, h, lq, lk, d = shape
    q = torch.randn(b, h, lq, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, h, lk, d, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    mask[0, ..., lk // 2:] = False  # padding keys, as in a batch of different sizes
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().sum().backward()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':<26}{'bf16 ms':>10}{'fp32 ms':>10}{'bf16/fp32':>11}")
    for name, shape in SHAPES.items():
        bf16 = time_call(shape, torch.bfloat16, args.repeats)
        fp32 = time_call(shape, torch.float32, args.repeats)
        print(f"{name:<26}{bf16:>10.2f}{fp32:>10.2f}{bf16 / fp32:>10.2f}x")


if __name__ == "__main__":
    main()
