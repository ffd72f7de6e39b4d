"""Subprocess helpers shared by the training tests: a run SIGKILLed after its first save while a
reference runs in this process, and the same run under torchrun (2 gloo processes) and alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kill_after_first_save(argv: Sequence[str], last: Path, log: Path, reference: Callable[[], None]) -> int:
    """``python -m pipeline *argv`` (one OpenMP thread) SIGKILLed as soon as ``last`` exists; ``reference()``
    runs in this process meanwhile (overlapping the subprocess's start-up). Returns the subprocess's code."""
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT)

    def kill() -> None:
        deadline = time.monotonic() + 300
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        reference()
    finally:
        killer.join()
    return proc.returncode


def torchrun_and_alone(argv_of: Callable[[str], list[str]], logs: Path) -> dict[str, str]:
    """Runs ``argv_of("ddp")`` under torchrun with 2 CPU (gloo) processes and ``argv_of("single")`` in one
    process at the same time; asserts both exit 0 and returns their logs by run name."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    procs = []
    for run, launcher in (("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
                          ("single", [])):
        with (logs / f"{run}.log").open("wb") as out:
            procs.append((run, subprocess.Popen([sys.executable, *launcher, "-m", "pipeline", *argv_of(run)],
                                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)))
    texts = {}
    for run, proc in procs:
        code = proc.wait(timeout=300)
        texts[run] = (logs / f"{run}.log").read_text()
        assert code == 0, texts[run][-3000:]
    return texts


def assert_ok(code: int) -> None:
    """For lambdas: an in-process stage run that must succeed."""
    assert code == 0
