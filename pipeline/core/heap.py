"""The process heap: freed tensor memory kept for the next forward instead of handed back to the kernel.

glibc serves every allocation above 32 MiB (its largest mmap threshold) with a fresh mmap and unmaps
it on free, so each forward over a large image faults in and zeroes its activations again: on a 2-core
EPYC (AVX-512 BF16), CRAFT x4 on a 512^2 image took 12.5 s (bf16) and 22.5 s (fp32), most of the
difference being system time, against 7.6 s and 10.9 s with the memory kept (BENCHMARKS.md). The
stages that compute call ``keep_freed_memory`` first: large blocks come from the heap, and freed
memory stays there for the next forward (the process's peak is what it was; its floor no longer
falls between forwards). ``SR_HEAP=system`` leaves glibc's defaults. Elsewhere (no glibc) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
HEAP_ENV = "SR_HEAP"
KEEP_BYTES = 2**31 - 1  # free memory at the top of the heap that free() keeps (mallopt takes an int: ~2 GiB)


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed memory there; True when glibc took both settings."""
    if os.environ.get(HEAP_ENV, "").strip().lower() == "system":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
