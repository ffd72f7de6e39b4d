"""How far a figure is from the physical limit: FLOPs of a call, achieved TFLOP/s, share of the peak.

``count_flops(fn, *args)`` runs ``fn`` once under ``torch.utils.flop_counter.FlopCounterMode``
(convolutions, matrix products, attention; element-wise work is not counted, so the share is of
the arithmetic the tensor cores could do). ``peak_tflops(device)`` is the device's dense bf16
peak: the datasheet figure for known GPUs and, always, a measured large bf16 matrix product
(fp32 on a CPU without native bf16), so a table can give both shares. Benchmarks report
``achieved = flops / seconds`` and ``share = achieved / peak``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' datasheets, by a substring of
# torch.cuda.get_device_name(). The first match wins, so the more specific names come first.
DATASHEET_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call of ``fn`` (forward, plus backward when ``fn`` runs it); counted, not timed."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def datasheet_tflops(device: torch.device) -> float | None:
    """The datasheet's dense bf16 TFLOP/s of a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16_TFLOPS if key in name), None)


@functools.cache
def measured_tflops(device_str: str, dtype: torch.dtype = torch.bfloat16, n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of a large square matrix product: what the device delivers in practice."""
    device = torch.device(device_str)
    if device.type == "cpu":
        n, repeats = 1024, 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b  # warm-up: kernel selection, clocks
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def peak_tflops(device: torch.device) -> dict[str, float | None]:
    """``{"datasheet": ..., "measured": ...}`` dense peaks in TFLOP/s (bf16 on GPUs and bf16 CPUs)."""
    from pipeline.core.runtime import cpu_has_fast_bf16

    dtype = torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else torch.float32
    return {"datasheet": datasheet_tflops(device), "measured": measured_tflops(str(device), dtype)}


def utilisation(flops: float, seconds: float, peak: dict[str, float | None]) -> dict[str, float]:
    """Columns for a table: achieved TFLOP/s and its share (%) of each known peak."""
    achieved = flops / seconds / 1e12 if seconds > 0 else float("nan")
    row = {"tflops": achieved}
    for kind, value in peak.items():
        row[f"pct_{kind}_peak"] = 100 * achieved / value if value else float("nan")
    return row
