"""Measurements around a training loop: step times, GPU utilisation, FLOPs and MFU.

Used by ``benchmarks/train_loop.py``; each function works on the CPU too (GPU-only numbers are
``None`` there, printed as n/a).
"""

from __future__ import annotations

import subprocess
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peak TFLOP/s per precision, from NVIDIA's datasheets (H100/H200 SXM:
# 989 bf16 and 495 tf32 are half the "with sparsity" figures 1,979 and 989; A100: 312 / 156).
# fp32 rows are timed against the TF32 peak: cuDNN runs fp32 convolutions on TF32 tensor cores
# by default (torch.backends.cudnn.allow_tf32). This workplace measured 769-798 TFLOP/s for
# an 8192^3 bf16 matmul on one H200 (/work/.library/device/KINDS.md): 989 is not reachable.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 494.7},
    "H100": {"bf16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    """``override`` if given, else the table's entry for this GPU; None on the CPU or an
    unknown GPU (MFU is then printed as n/a; pass ``--peak-tflops``)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return None


class StepClock:
    """Timestamps of optimiser steps, taken by a step post-hook (the same hook on both loops).

    The clock starts after ``warmup`` (>= 1) steps and stops after ``warmup + steps``; on CUDA
    those two steps synchronise the device, the others do not (each loop already syncs once per step
    when it reads its loss for logging), so the window holds exactly ``steps`` steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, *, warmup: int,
                 steps: int, on_start: Callable[[], None] | None = None,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        self.on_start, self.on_stop = on_start, on_stop
        self.count, self.times = 0, []
        self._handle = optimizer.register_step_post_hook(self._tick)

    def _tick(self, *_):
        self.count += 1
        if self.count not in (self.warmup, self.warmup + self.steps):
            return
        if self.count == self.warmup + self.steps and self.on_stop:
            self.on_stop()  # before this hook's own sync, which is not the loop's
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        if self.count == self.warmup and self.on_start:
            self.on_start()

    def close(self) -> float:
        """Seconds per step over the window (its total time / ``steps``).

        Raises:
            RuntimeError: the loop ran fewer than ``warmup + steps`` steps.
        """
        self._handle.remove()
        if len(self.times) < 2:
            raise RuntimeError(f"the loop ran {self.count} optimiser steps, fewer than warmup "
                               f"{self.warmup} + steps {self.steps}")
        return (self.times[-1] - self.times[0]) / self.steps


class GpuUtilisation:
    """Mean GPU utilisation (%) sampled every ``period`` s in a thread between start() and
    stop(): ``torch.cuda.utilization()`` (NVML) where it works, else ``nvidia-smi``."""

    def __init__(self, device: torch.device, period: float = 0.2) -> None:
        self.device, self.period = device, period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # no pynvml / NVML refused: ask nvidia-smi  # noqa: BLE001
            pass
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"--id={self.device.index or 0}"],
                capture_output=True, text=True, timeout=5, check=True).stdout
            return float(out.split()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def _loop(self):
        while not self._stop.wait(self.period):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def start(self) -> None:
        if self.device.type == "cuda" and self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self) -> float | None:
        """The mean of the samples, or None (CPU, or no reader worked)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        return sum(self.samples) / len(self.samples) if self.samples else None


class SyncCounter:
    """Host-device synchronisations in the timed window, found by
    ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA only: None elsewhere).

    Use as a context around the loop; :meth:`start` / :meth:`stop` bound the window (the
    :class:`StepClock` hooks call them). Each sync is a warning whose Python frame (file:line)
    names the code that caused it.
    """

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self._records: list = []
        self._window = (0, 0)

    def __enter__(self):
        if self.enabled:
            self._context = warnings.catch_warnings(record=True)
            self._records = self._context.__enter__()
            warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.cuda.set_sync_debug_mode(0)
            self._context.__exit__(*exc)

    def start(self) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode("warn")
            self._window = (len(self._records), len(self._records))

    def stop(self) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode(0)
            self._window = (self._window[0], len(self._records))

    def summary(self, steps: int) -> dict | None:
        """``{"per_step": float, "sites": [["file:line", count], ...]}`` (the 8 most
        frequent sites), or None off CUDA."""
        if not self.enabled:
            return None
        window = [w for w in self._records[slice(*self._window)]
                  if "synchroniz" in str(w.message)]
        sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in window)
        return {"per_step": len(window) / steps, "sites": sites.most_common(8)}


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` (a forward + loss + backward) by
    ``torch.utils.flop_counter`` (matmuls, convolutions, attention; elementwise ops count 0)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def peak_memory_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since :func:`peak_memory_start`, MiB; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
