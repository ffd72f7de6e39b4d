"""``train.compile``: what the training step calls, eager or through torch.compile, and its warm-up.

torch.compile wraps what the step calls (the model, or its DDP wrapper, compiled as a whole) and
nothing else: the fp32 loss, gradient clipping, the scaler, the optimizer and the EMA stay eager,
and validation and checkpoints use the eager module, so state dicts keep their plain keys. The
patch shape is fixed for a run (whole patches or train.crop, the epoch's tail batch dropped), so
the graph is compiled for static shapes once. With mode=reduce-overhead the compiled forward and
backward replay as CUDA graphs; each step then begins a new graph iteration.
"""

from __future__ import annotations

import time

import torch
from torch import nn

# Steps after torch.compile until the step runs at speed: the first call compiles the forward and
# backward graphs; with CUDA graphs the second records them and the third replays them.
COMPILE_WARMUP_STEPS = 3


class StepCompiler:
    """The module the step calls (``call``) and the torch.compile mode in use (``mode``, 'off' = eager)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = self.call = model
        self.mode = "off"
        self._warmup: tuple[float, int] | None = None  # (clock, step) at use(), until the warm-up is timed

    def use(self, mode: str, step: int) -> bool:
        """Call the model through torch.compile(mode) from step ``step`` on; False for 'off'."""
        if mode == "off":
            return False
        self.call = torch.compile(self.model, mode=mode, dynamic=False)
        self.mode = mode
        self._warmup = (time.perf_counter(), step)
        return True

    def begin_step(self) -> None:
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are dead: reuse their memory

    def warmed_up(self, step: int, device: torch.device) -> tuple[float, int] | None:
        """(seconds, steps) of the warm-up, once, when COMPILE_WARMUP_STEPS steps have run since use()."""
        if self._warmup is None or step - self._warmup[1] < COMPILE_WARMUP_STEPS:
            return None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, first = self._warmup
        self._warmup = None
        return time.perf_counter() - start, step - first

    def steady_from(self, step: int) -> int:
        """The first step after the warm-up of a compile begun at ``step`` (``step`` itself when eager)."""
        return step + (COMPILE_WARMUP_STEPS if self.mode != "off" else 0)
