"""The process heap policy (pipeline/core/heap.py): a freed large block is reused by the next allocation
instead of being faulted in afresh, and SR_HEAP=system leaves glibc's defaults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
from procs import ROOT

# 64 MiB (above glibc's largest mmap threshold, 32 MiB) allocated, freed, allocated again: the page
# faults of the second allocation are what a forward over a large image pays each time.
CODE = """
import resource, sys
import numpy as np
from pipeline.core.heap import keep_freed_memory
print(int(keep_freed_memory()))
a = np.ones(64 * 2**20 // 8); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(64 * 2**20 // 8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(heap: str) -> tuple[bool, int]:
    env = {**os.environ, "SR_HEAP": heap, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    taken, faults = out.stdout.split()
    return bool(int(taken)), int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the heap policy is glibc's mallopt (Linux with glibc)")
def test_a_freed_block_is_reused_instead_of_faulted_in_again() -> None:
    taken, kept = _faults("")
    declined, fresh = _faults("system")
    assert taken and not declined
    assert fresh >= 16  # glibc's default: the second 64 MiB block is a new mapping, faulted in again
    assert kept * 10 <= fresh  # kept: the freed block is reused (measured 0 against 544 faults)
