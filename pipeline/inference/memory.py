"""How much work one forward may carry: LR pixels per call, and memory measured on the device.

Two bounds size every forward of inference (the tile batch of ``tiling.auto_batch``, the ensemble's
ways per call of ``ensemble.self_ensemble``, ``infer.tile=auto`` in ``windows``):

- Pixels per call (``pixels_per_call``): past a few hundred thousand LR pixels a GPU is busy and a
  larger call only adds memory traffic; on the CPU ~32k. Splitting a call costs nothing measurable.
- Memory: a probe runs one tile through the forward and measures its peak (CUDA: the allocator's peak;
  CPU: the process's peak resident memory, reset first through /proc/self/clear_refs), taken as
  proportional to pixels (convolutions and window attention are local). The budget is a share of
  what the device has free (CUDA: free VRAM, capped at ``CUDA_MEMORY_CAP``; CPU: available RAM, the
  cgroup's limit included), as chaiNNer sizes its tiles.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.core.errors import UserError

Forward = Callable[[torch.Tensor], torch.Tensor]


class TileMemoryError(UserError):
    """A single tile does not fit in memory: the user must lower the tile size."""


def is_oom(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's failure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)

# LR pixels per forward on the CPU (tiles x ensemble ways x tile area). bench/infer_speed.py on a
# 2-core AVX2 EPYC (BENCHMARKS.md): 49 tiles of 32^2 without ensemble ran 2.7x faster in batches
# of 32 than of 4; with 8 ways, more than ~32k pixels per call was no faster overall (+-30% by
# model) and took 3x the memory.
CPU_PIXELS = 32 * 32 * 32
# LR pixels per forward on CUDA. One H100, RRDB, 512 LR, 49 tiles of 128^2 x 8 ways, bf16 eager
# (shared/measurements/h100-2026-11-23/rrdb_infer_levers.txt): 1 tile per forward (131k px)
# 2.29 s/image at 1.3 GiB, 4 tiles (524k px) 2.05 s at 4.5 GiB, the best eager point measured.
# The previous rule (fill 60% of free memory) chose ~70 GB batches that were slower than 1 tile
# for every model (EDSR 2.87 s vs 0.41 s, infer_speed_cuda.csv): past a few hundred thousand
# pixels the card is already busy and a larger batch only adds memory traffic.
CUDA_PIXELS = 4 * 8 * 128 * 128
# Memory cap on CUDA: the batch times the measured peak of one tile (ensemble included) must stay
# within min(CUDA_MEMORY_CAP, CUDA_FREE_SHARE x free memory). 8 GiB is the contest geometry's
# ceiling we set ourselves and leaves a 24 GB card room; the share keeps a busy or small card safe.
CUDA_MEMORY_CAP = 8 * 2**30
CUDA_FREE_SHARE = 0.5
# The CPU's share of available RAM one forward may take: the rest stays for the outputs, the
# loader and whatever else the machine runs.
CPU_FREE_SHARE = 0.5
# Bytes per LR pixel of one image in a call where the CPU's peak cannot be measured (no
# /proc/self/clear_refs): the largest measured, fp32 on a 2-core AVX2 CPU (RRDB 14.7 KiB, CRAFT 11-12.6).
CPU_FALLBACK_BYTES_PER_PIXEL = 16 * 2**10


def pixels_per_call(device: torch.device) -> int:
    """LR pixels one forward carries at most (images x area), by the measured rule of the device."""
    return CUDA_PIXELS if device.type == "cuda" else CPU_PIXELS


def images_per_call(area: int, device: torch.device) -> int:
    """Images of ``area`` LR pixels one forward carries: ``pixels_per_call`` of them, at least one."""
    return max(1, pixels_per_call(device) // max(1, area))


def memory_budget(free_bytes: int, device: torch.device | None = None) -> int:
    """Bytes one forward may take: on CUDA ``CUDA_MEMORY_CAP`` or less on a small or busy card; on the
    CPU ``CPU_FREE_SHARE`` of the available RAM."""
    if device is not None and device.type != "cuda":
        return int(CPU_FREE_SHARE * free_bytes)
    return int(min(CUDA_MEMORY_CAP, CUDA_FREE_SHARE * free_bytes))


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def available_ram() -> int:
    """Bytes of RAM this process can still take: MemAvailable, lowered to the cgroup's headroom."""
    found = re.search(r"MemAvailable:\s+(\d+) kB", _read("/proc/meminfo"))
    free = int(found.group(1)) * 1024 if found else 8 * 2**30
    limit, used = _read("/sys/fs/cgroup/memory.max").strip(), _read("/sys/fs/cgroup/memory.current").strip()
    if limit.isdigit() and used.isdigit():
        free = min(free, max(0, int(limit) - int(used)))
    return free


def _resident() -> tuple[int, int] | None:
    """(peak, current) resident bytes of this process, or None where /proc does not say."""
    status = _read("/proc/self/status")
    peak, now = re.search(r"VmHWM:\s+(\d+) kB", status), re.search(r"VmRSS:\s+(\d+) kB", status)
    return (int(peak.group(1)) * 1024, int(now.group(1)) * 1024) if peak and now else None


def _reset_peak() -> bool:
    """Reset the process's peak resident memory to its current value (Linux 4.0+); False if refused.

    Freed heap is first handed back to the system (glibc's malloc_trim): memory the allocator kept from
    earlier work would be reused by the probe without growing the resident set, and hide its need
    (measured: CRAFT's probe read 99 MiB after a larger forward, 212 MiB after a trim)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


Probe = Callable[[Forward, int, tuple[int, ...], torch.device], tuple[int, int]]


def probe_tile_memory(fn: Forward, channels: int, tile_shape: tuple[int, ...], device: torch.device,
                      ) -> tuple[int, int]:
    """(peak bytes of one tile through ``fn``, ensemble included; free bytes of the device).

    CUDA: the allocator's peak over the call. CPU: the growth of the process's peak resident memory over
    the call; where it cannot be reset, ``CPU_FALLBACK_BYTES_PER_PIXEL`` per pixel of one call's images.
    """
    tile = torch.zeros(1, channels, *tile_shape, device=device)
    if device.type != "cuda":
        measurable = _reset_peak() and _resident() is not None
        before = _resident()
        fn(tile)
        after = _resident()
        if measurable and before is not None and after is not None and after[0] > before[1]:
            return after[0] - before[1], available_ram()
        area = 1
        for side in tile_shape:
            area *= side
        return CPU_FALLBACK_BYTES_PER_PIXEL * area, available_ram()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        fn(tile)
    except Exception as exc:
        if is_oom(exc):
            setting = "mri_infer.tile" if len(tile_shape) == 3 else "infer.tile"
            raise TileMemoryError(f"out of memory on a single {'x'.join(map(str, tile_shape))} tile on {device}; "
                            f"lower {setting} or use a smaller model") from exc
        raise
    torch.cuda.synchronize(device)
    per_tile = max(1, torch.cuda.max_memory_allocated(device) - base)
    return per_tile, torch.cuda.mem_get_info(device)[0]
