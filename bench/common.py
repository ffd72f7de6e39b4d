"""Helpers shared by the benchmark scripts: machine description, timing, memory, PSNR, tables, CSV.

Benchmarks compare variants in ONE process and report ratios and medians, because the machines
they run on are shared; absolute seconds are printed too but are only comparable within a table.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import math
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: torch.device) -> str:
    """One line: device, CPU model and cores, native bf16 or not, torch version, commit."""
    from pipeline.core.runtime import BF16_ENV, cpu_bf16

    commit = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    gpu = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    bf16 = {"amx": "native bf16 (AMX)", "avx512_bf16": "native bf16 (AVX-512 BF16, no AMX)",
            "emulated": "no native bf16 (no AMX / AVX-512 BF16)"}[cpu_bf16()]
    if os.environ.get(BF16_ENV):
        bf16 += f" ({BF16_ENV}={os.environ[BF16_ENV]})"
    return (f"{gpu}{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {bf16}; "
            f"torch {torch.__version__}; commit {commit}; load {os.getloadavg()[0]:.2f}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trim() -> None:
    """Give freed heap back to the OS so the next block's RSS peak starts from a clean baseline."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@contextmanager
def measure(device: torch.device) -> Iterator[dict[str, float]]:
    """Seconds and peak memory (MiB) of a block.

    CUDA: the allocator's peak above what was allocated before. CPU: the resident-set peak above
    the start, sampled every 2 ms (approximate: the allocator may keep or reuse freed pages).
    """
    out: dict[str, float] = {}
    stop = threading.Event()
    peak = [0.0]
    sampler = None
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _trim()
        base = _rss_mib()
        peak[0] = base

        def sample() -> None:
            while not stop.wait(0.002):
                peak[0] = max(peak[0], _rss_mib())
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    start = time.perf_counter()
    try:
        yield out
    finally:
        sync(device)
        out["seconds"] = time.perf_counter() - start
        if device.type == "cuda":
            out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            stop.set()
            assert sampler is not None
            sampler.join()
            out["peak_mib"] = max(peak[0], _rss_mib()) - base


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Contest PSNR of two float images in [0,1] (clamped, rounded to uint8 first, as a PNG would be)."""
    def u8(x: Any) -> np.ndarray:
        x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        return np.round(np.clip(x, 0, 1) * 255).astype(np.float64)
    mse = float(np.mean((u8(a) - u8(b)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def interleaved(variants: Sequence[str], repeats: int, run: Callable[[str, int], None]) -> None:
    """Call ``run(variant, repeat)`` round-robin, so slow drifts of a shared machine hit every variant."""
    for r in range(repeats):
        for v in variants:
            run(v, r)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-markdown table (pastes straight into BENCHMARKS.md)."""
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def pick(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_rows(rows: list[dict[str, Any]], device: torch.device, name: str, csv_path: Path | None) -> tuple[Path, str]:
    """Stamp every row with the machine line and write the CSV (default bench/results/<name>_<device>.csv)."""
    info = machine(device)
    for r in rows:
        r["machine"] = info
    return write_csv(rows, csv_path or RESULTS / f"{name}_{device.type}.csv"), info


def add_stage_options(p: argparse.ArgumentParser, what: str) -> None:
    """--device, --set: where the train stage runs and settings for it (the benches that run the train stage)."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present) or cpu: where the stage trains")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"settings for {what} (e.g. --set train.val_every=50)")


def stage_device(name: str) -> torch.device:
    """The device of ``--device``; for the CPU, CUDA is hidden, since the stages pick it whenever they see it."""
    device = pick(name)
    if device.type == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return device


def demo_dataset(root: Path, *patchify: str) -> Path:
    """root/demo: the demo data, prepared and patchified with ``patchify``'s settings, as a user makes it."""
    from pipeline.cli import main as cli

    data = root / "demo"
    for argv in (["demo-data", "--out", str(data)], ["prepare", "--data", str(data)],
                 ["patchify", "--data", str(data), *patchify]):
        if cli(argv) != 0:
            raise SystemExit(f"`python -m pipeline {' '.join(argv)}` failed")
    return data


def read_run_log(models: Path, run: str) -> list[dict[str, Any]]:
    """The entries of a train run's log.jsonl (``models/<run>``)."""
    from pipeline.core.layout import RunLayout
    from pipeline.training.run_folder import read_log

    return read_log(RunLayout(models, run).log)
