"""Worker processes: how many a setting may ask for, and pools whose workers die with their parent.

Every ``*.workers`` setting (data, patchify, add_data, train) starts that many processes of a few
hundred MB each, so a typo (``train.workers=100000``) would bring the machine's out-of-memory
killer rather than speed: more than ``MAX_PER_CPU`` x the CPUs this process may use is refused in
one line before anything starts.

``process_pool(n)`` is a ``ProcessPoolExecutor`` whose workers exit when the stage's process dies,
even by SIGKILL (which runs no clean-up): on Linux the kernel signals them
(``prctl(PR_SET_PDEATHSIG)``), elsewhere a thread in each worker watches its parent. Without this
a killed ``add-data`` or ``patchify`` left its workers running forever, adopted by PID 1.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from pipeline.core.errors import UserError

MAX_PER_CPU = 4  # loader workers that mostly wait on the disk can use more than one per CPU, not hundreds
_PR_SET_PDEATHSIG = 1


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_workers() -> int:
    return max(8, MAX_PER_CPU * usable_cpus())


def check_worker_counts(cfg: Any) -> None:
    """Refuse any ``<section>.workers`` above ``max_workers()``, naming the setting and the bound."""
    cap = max_workers()
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            if f.name.endswith("workers") and getattr(values, f.name) > cap:
                raise UserError(f"{section.name}.{f.name}={getattr(values, f.name)} is more than {cap} "
                                f"({MAX_PER_CPU} x the {usable_cpus()} CPUs this process may use); each worker is a "
                                "process of its own: lower it")


def _watch(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def die_with_parent(parent: int) -> None:
    """Worker initializer: exit when process ``parent`` (the one that started the pool) dies."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch, args=(parent,), daemon=True, name="parent-watch").start()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes that die with this one (see the module's docstring)."""
    # Workers must be this process's own children (fork, or spawn off Linux): under a forkserver (Python
    # 3.14's Linux default) their parent would be the server, and the death signal would wait for it instead.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),))
