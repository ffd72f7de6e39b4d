"""The train stage's run folder (``pipeline.layout.RunLayout``): step history, RNG state, log.jsonl,
TensorBoard, curves, and the rules that keep trained weights safe.

models/<run>/
    config.yaml     resolved config of the latest successful start
    last.pth        full training state (resume point)
    best.pth        weights of the best validation PSNR (never replaced by a worse one)
    history/step_00000500.pth   weights every train.save_every steps (newest train.keep_last kept)
    log.jsonl       one JSON object per log point or validation
    curves.png      loss and validation PSNR against steps
    tb/             TensorBoard scalars

Nothing here deletes a run: starting over (``train.resume=never``) renames the old folder to
``models/<run>.old-<time>`` and says so.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.files import atomic_write
from pipeline.layout import RunLayout

PLOT_SECONDS = 60.0


def move_aside(run: RunLayout) -> Path:
    """Rename ``models/<run>`` to ``models/<run>.old-<time>`` (a new name, never over another) and
    return where it went: starting a run over never deletes trained weights."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        target = run.dir.with_name(f"{run.run}.old-{stamp}" + (f"-{n}" if n else ""))
        if not target.exists():
            os.rename(run.dir, target)
            return target
    raise FileExistsError(f"{run.dir}: no free name to move it aside")


def prune_history(run: RunLayout, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints of this run (they are its own, by step)."""
    files = run.history_files()
    for old in files[: max(0, len(files) - keep)]:
        old.unlink()


def rng_state() -> dict[str, Any]:
    """Every global RNG as plain types (numpy's key array as a tensor) for weights_only loading."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunLog:
    """log.jsonl + TensorBoard + curves.png; a no-op on ranks other than 0.

    On resume, entries written after the checkpoint's step (by a run killed before its next save)
    are dropped from log.jsonl and TensorBoard, so the log tells one consistent history.
    """

    def __init__(self, run: RunLayout, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self._plotted = -math.inf
        self.path = run.log
        self.curves_path = run.curves
        if not enabled:
            return
        self.entries = [e for e in self._read() if e["step"] <= start_step]
        with atomic_write(self.path) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in self.entries))
        from torch.utils.tensorboard import SummaryWriter  # slow import: rank 0 only

        self.writer = SummaryWriter(str(run.tb), purge_step=start_step + 1 if start_step else None)

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        # A kill can cut the last line short; every complete line before it is kept.
        return [json.loads(line) for line in lines[:-1] if line] + _parse_last(lines[-1:])

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        """Append one entry and its scalars (``loss/...``, ``val/...``, ``learning_rate``)."""
        if not self.enabled:
            return
        entry = {"step": step, "kind": kind, **{k: _json_float(v) for k, v in values.items()}}
        self.entries.append(entry)
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        for name, value in values.items():
            if "/" in name or name == "learning_rate":
                self.writer.add_scalar(name, value, step)

    def plot(self, force: bool = False) -> None:
        """curves.png: training loss and validation PSNR (with the bicubic baseline) against steps.

        Drawing takes most of a second on a CPU, so between forced plots (the end of a run) it is
        redrawn at most once a minute.
        """
        if not self.enabled or not (force or time.monotonic() - self._plotted >= PLOT_SECONDS):
            return
        self._plotted = time.monotonic()
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and in notebooks' worker processes
        import matplotlib.pyplot as plt

        train = [e for e in self.entries if e["kind"] == "train"]
        val = [e for e in self.entries if e["kind"] == "val" and e.get("val/psnr") is not None]
        fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(11, 4))
        ax_loss.plot([e["step"] for e in train], [e["loss/total"] for e in train], lw=1)
        ax_loss.set(xlabel="step", ylabel="loss/total", yscale="log", title="training loss")
        ax_psnr.plot([e["step"] for e in val], [e["val/psnr"] for e in val], "o-", ms=3, label="model")
        bicubic = [e["val/bicubic_psnr"] for e in val if e.get("val/bicubic_psnr") is not None]
        if bicubic:
            ax_psnr.axhline(bicubic[-1], color="gray", ls="--", label="bicubic")
        ax_psnr.set(xlabel="step", ylabel="PSNR (dB)", title="validation PSNR (RGB uint8)")
        ax_psnr.legend()
        fig.tight_layout()
        with atomic_write(self.curves_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


def _parse_last(lines: list[str]) -> list[dict[str, Any]]:
    try:
        return [json.loads(lines[0])] if lines and lines[0] else []
    except json.JSONDecodeError:
        return []


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
