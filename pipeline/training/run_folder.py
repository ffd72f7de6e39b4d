"""The train stage's run folder (``pipeline.core.layout.RunLayout``): step history, RNG state, log.jsonl,
TensorBoard, curves, and the rules that keep trained weights safe.

models/<run>/
    config.yaml     resolved config of the latest successful start
    last.pth        full training state (resume point)
    best.pth        the best validated weights by the objective's rule (BestCheckpoint; never replaced by a worse one)
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import CheckpointError
from pipeline.core.files import append_text, atomic_write
from pipeline.core.layout import RunLayout
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint

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


def best_score_of(metrics: dict[str, Any], rule: str) -> float:
    """The score (higher is better) of validated weights under ``rule``: their PSNR (``psnr``), minus
    their LPIPS (``lpips``), or their step (``last``: the newest wins). ``metrics``: a validation's
    metrics with its step, or a best.pth (whose ``psnr``, ``lpips`` and ``step`` are the same)."""
    if rule == "lpips":
        return -float(metrics.get("lpips", math.inf))
    if rule == "last":
        return float(metrics.get("step", -math.inf))
    return float(metrics.get("psnr", metrics.get("best_psnr", -math.inf)))


@dataclass
class BestCheckpoint:
    """best.pth: the validated weights that score best under ``rule`` (psnr, lpips or last), with
    their metrics and ``best_by``. It is replaced only when beaten, also by the best.pth an earlier
    start left on disk (``floor``: its score; that start may have been killed before saving last.pth),
    and by the best.pth on disk at the moment of saving (read again before every replacement)."""

    path: Path
    rule: str
    floor: float = -math.inf
    score: float = -math.inf  # of the best validation this run knows of
    psnr: float = -math.inf  # its PSNR
    step: int = -1  # its step

    def offer(self, metrics: dict[str, float], step: int, checkpoint: Callable[[], dict[str, Any]],
              write: bool) -> bool:
        """Take a validation's ``metrics``; True when it is the new best (``checkpoint()`` written when ``write``)."""
        score = best_score_of({**metrics, "step": step}, self.rule)
        if score <= self.score:
            return False
        self.score, self.psnr, self.step = score, metrics["psnr"], step
        if write and score > self.floor and score > self.on_disk():
            save_checkpoint(self.path, {**checkpoint(), **metrics, "best_by": self.rule})
        return True

    def on_disk(self) -> float:
        """The score of the best.pth on disk now (-inf when there is none, or it cannot be read): whatever
        wrote it (another start, a copy by hand), a better file is never replaced."""
        if not self.path.is_file():
            return -math.inf
        try:
            return best_score_of(load_checkpoint(self.path, mmap=True), self.rule)  # metadata only: no tensor read
        except (CheckpointError, TypeError, ValueError):
            return -math.inf


def prune_history(run: RunLayout, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints of this run (they are its own, by step)."""
    files = run.history_files()
    for old in files[: max(0, len(files) - keep)]:
        old.unlink()


def load_training_state(trainer: Any, state: dict[str, Any], path: Path) -> None:
    """``trainer.load_state(state)`` of a last.pth, any malformed entry (step, progress, RNG state) one line
    naming the file instead of a traceback from deep inside torch, numpy or random."""
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**53:
        raise _unresumable(path, f"step {str(step)[:40]!r} is not a step number")
    try:
        trainer.load_state(state, path)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, OverflowError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise _unresumable(path, f"{type(exc).__name__}: {first}") from None


def _unresumable(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: malformed training state ({problem}); it cannot be resumed: train.resume=never "
                           "starts over (the old run is moved aside, not deleted)")


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


def read_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a run's log.jsonl (none when it does not exist yet). A kill can cut the last line
    short; every complete line before it is kept."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines[:-1] if line] + _parse_last(lines[-1:])


class RunLog:
    """log.jsonl + TensorBoard + curves.png; a no-op on ranks other than 0.

    On resume, entries written after the checkpoint's step (by a run killed before its next save)
    are dropped from log.jsonl and TensorBoard, so the log tells one consistent history; so are the
    entries at that very step of the ``redo`` kinds, which were written after the save and which the
    resumed session writes again (a validation and a phase start at a phase boundary).
    """

    def __init__(self, run: RunLayout, start_step: int, enabled: bool, redo: frozenset[str] = frozenset()) -> None:
        self.enabled = enabled
        self.phase = ""  # the phase of train.phases each entry is written in ('' = a run without phases)
        self._plotted = -math.inf
        self.path = run.log
        self.curves_path = run.curves
        if not enabled:
            return
        self.entries = [e for e in self._read()
                        if e["step"] < start_step or (e["step"] == start_step and e["kind"] not in redo)]
        with atomic_write(self.path) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in self.entries))
        from torch.utils.tensorboard import SummaryWriter  # slow import: rank 0 only

        self.writer = SummaryWriter(str(run.tb), purge_step=start_step + 1 if start_step else None)

    def _read(self) -> list[dict[str, Any]]:
        return read_log(self.path)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        """Append one entry and its scalars (``loss/...``, ``val/...``, ``learning_rate``)."""
        if not self.enabled:
            return
        entry = {"step": step, "kind": kind, **({"phase": self.phase} if self.phase else {}),
                 **{k: _json_float(v) for k, v in values.items()}}
        self.entries.append(entry)
        append_text(self.path, json.dumps(entry) + "\n")
        for name, value in values.items():
            if "/" in name or name == "learning_rate":
                self.writer.add_scalar(name, value, step)

    def plot(self, force: bool = False) -> None:
        """curves.png: training losses and validation PSNR (with the baseline) against steps; a GAN
        run gets the generator's losses (total and adversarial) and the discriminator's in two panels.

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
        gan = any("loss/d_total" in e for e in train)
        fig, axes = plt.subplots(1, 3 if gan else 2, figsize=(16 if gan else 11, 4))
        panels = [("generator losses" if gan else "training loss", ("loss/total", "loss/adversarial"))]
        if gan:
            panels.append(("discriminator losses", ("loss/d_total", "loss/d_real", "loss/d_fake", "loss/d_gp")))
        for ax, (title, keys) in zip(axes, panels):
            for key in keys:
                points = [(e["step"], e[key]) for e in train if e.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), lw=1, label=key)
            # Adversarial terms can be negative (WGAN): a log axis only for positive curves.
            positive = all(v > 0 for line in ax.get_lines() for v in line.get_ydata())
            ax.set(xlabel="step", ylabel="loss", yscale="log" if positive else "linear", title=title)
            if gan:
                ax.legend(fontsize=8)
        if not gan:
            axes[0].set(ylabel="loss/total")
        ax_psnr = axes[-1]
        ax_psnr.plot([e["step"] for e in val], [e["val/psnr"] for e in val], "o-", ms=3, label="model")
        for key in sorted({k for e in val for k in e if k.endswith("_psnr") and k != "val/best_psnr"}):
            ax_psnr.axhline([e[key] for e in val if e.get(key) is not None][-1], color="gray", ls="--",
                            label=key.removeprefix("val/").removesuffix("_psnr"))
        ax_psnr.set(xlabel="step", ylabel="PSNR (dB)", title="validation PSNR (RGB uint8)")
        ax_psnr.legend()
        for step, name in phase_starts(self.entries):  # train.phases: where each phase begins, on every panel
            for ax in axes:
                ax.axvline(step, color="tab:purple", ls=":", lw=1)
            axes[0].annotate(name, (step, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                             textcoords="offset points", fontsize=8, color="tab:purple")
        fig.tight_layout()
        with atomic_write(self.curves_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


def phase_starts(entries: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(step, name) where each phase of train.phases begins, from the log's entries."""
    return [(e["step"], e["phase"]) for e in entries if e["kind"] == "phase"]


def _parse_last(lines: list[str]) -> list[dict[str, Any]]:
    try:
        return [json.loads(lines[0])] if lines and lines[0] else []
    except json.JSONDecodeError:
        return []


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
