"""Device and precision choices shared by train, infer and the benchmarks."""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


def pick_device() -> torch.device:
    """CUDA when present (the local rank's GPU under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX or AVX-512 BF16).

    Without these, oneDNN emulates bf16 and autocast is far slower than fp32 (measured on an
    AVX2-only EPYC: 10x slower even with channels_last), so 'auto' must not pick it there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32.

    ``auto``: bf16 on CUDA GPUs that support it (fp16 on older ones), bf16 on CPUs with native
    bf16, fp32 elsewhere. Explicit ``bf16``/``fp16`` are honoured (fp16 on CPU is refused).
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return torch.float16
    raise ValueError(f"unknown precision {precision!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Measure peak memory of the block in MiB: CUDA allocator peak, or process max RSS on CPU."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        # ru_maxrss is KiB on Linux; it is the process high-water mark, not the block's alone.
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
