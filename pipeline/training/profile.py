"""``train.profile_steps=N``: where the time of a training step goes, measured by torch.profiler.

The loop marks the sections of a step (``train/data`` = waiting for the loader, ``train/to_device``,
``train/forward``, ``train/discriminator`` (a GAN step's critic updates),
``train/loss``, ``train/backward``, ``train/clip``, ``train/optimizer``,
``train/ema``, ``train/after_step`` = logging, validation and checkpoints at their steps) with
``record_function``. After the session's warm-up (compilation included) one more step warms the
profiler up, N steps are recorded, and models/<run>/profile/ gets:

    trace.json   Chrome / Perfetto trace (chrome://tracing, https://ui.perfetto.dev)
    ops.txt      the top operators by self time (device time on a GPU, CPU time otherwise)
    sections.txt milliseconds per step of each section, and its share of the step

Training goes on unprofiled afterwards. Off (the default), a section is a no-op context.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from pipeline.core.files import atomic_write

SECTIONS = ("data", "to_device", "forward", "discriminator", "loss", "backward", "clip", "optimizer", "ema",
          "after_step")  # discriminator: a GAN step's critic updates
_NO_SECTION = contextlib.nullcontext()


class StepProfiler:
    """Profiles ``steps`` training steps; ``section(name)`` marks a part of a step, ``step()`` ends one."""

    def __init__(self, out: Path, steps: int, device: torch.device, enabled: bool) -> None:
        """``out``: the run's profile folder (``RunLayout.profile``)."""
        self.out, self.steps, self.device = out, steps, device
        self.enabled = enabled and steps > 0
        self.summary = ""
        self._prof: profile | None = None
        self._calls = 0  # step() calls since start(): the first is the profiler's warm-up step

    def start(self) -> None:
        """Begin recording (called once the session's warm-up is over)."""
        if not self.enabled or self._prof is not None:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._prof = profile(activities=activities, on_trace_ready=self._write,
                             schedule=schedule(wait=0, warmup=1, active=self.steps, repeat=1))
        self._prof.start()

    def section(self, name: str) -> contextlib.AbstractContextManager:
        return record_function(f"train/{name}") if self._prof is not None else _NO_SECTION

    def step(self) -> None:
        if self._prof is not None:
            self._calls += 1
            self._prof.step()  # after the last active step this writes the files (self._write)

    def stop(self) -> None:
        """End recording; a run that stops before the profile is complete writes the steps it has."""
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()

    def _write(self, prof: profile) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.out / "trace.json") as tmp:
            prof.export_chrome_trace(str(tmp))
        on_gpu = self.device.type == "cuda"
        events = prof.key_averages()
        ops = events.table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total", row_limit=25)
        with atomic_write(self.out / "ops.txt") as tmp:
            tmp.write_text(ops + "\n")
        self.summary = section_table(events, max(1, min(self.steps, self._calls - 1)), on_gpu)
        with atomic_write(self.out / "sections.txt") as tmp:
            tmp.write_text(self.summary + "\n")
        self.enabled = False  # one profile per session
        self._prof = None  # later sections and steps are plain again (the profiler has stopped itself)


def section_table(events: list, steps: int, on_gpu: bool) -> str:
    """Milliseconds per step of each marked section (CPU wall time of the range; on a GPU also the
    device time of the kernels it launched) and its share of the summed sections."""
    by_name = {e.key: e for e in events}
    rows = []
    for name in SECTIONS:
        e = by_name.get(f"train/{name}")
        if e is None:
            continue
        cpu = e.cpu_time_total / 1e3 / steps
        gpu = getattr(e, "device_time_total", 0.0) / 1e3 / steps if on_gpu else None
        rows.append((name, cpu, gpu))
    total = sum(cpu for _, cpu, _ in rows) or 1.0
    head = f"{'section':<11} {'ms/step (CPU)':>14} {'share':>6}" + (f" {'ms/step (GPU)':>14}" if on_gpu else "")
    lines = [f"{steps} profiled steps", head]
    for name, cpu, gpu in rows:
        lines.append(f"{name:<11} {cpu:>14.2f} {100 * cpu / total:>5.1f}%" + (f" {gpu:>14.2f}" if on_gpu else ""))
    lines.append(f"{'step':<11} {total:>14.2f} {100.0:>5.1f}%")
    return "\n".join(lines)
