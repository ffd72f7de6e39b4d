"""What the ranks of a torchrun session decide together at a log point (one all-reduce).

Decisions that depend on the clock or on a signal (the time budget, SIGTERM, the length of a
time-budgeted cosine, train.compile=auto, a phase's minutes) would split the ranks if each took
them alone: each rank votes, the all-reduce keeps the largest vote, and every rank follows it at
the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.core.distributed import Dist


@dataclass
class Votes:
    """What the ranks decide together at a log point: each rank votes, the all-reduce keeps the largest."""

    signal: bool = False  # a rank got SIGTERM / SIGINT: save and stop
    out_of_time: bool = False  # train.max_minutes is spent
    cosine_length: int = 0  # rank 0's estimate of a time-budgeted cosine's length in steps (0 = keep it)
    compile: bool = False  # rank 0's vote for train.compile=auto at the first log point
    phase_over: bool = False  # a phase of train.phases that lasts minutes has had them

    def agree(self, d: Dist) -> Votes:
        """Every rank's votes combined (any signal stops all; rank 0 alone votes on pace and compile)."""
        if d.world == 1:
            return self
        shared = torch.tensor([float(self.signal), float(self.out_of_time), float(self.cosine_length),
                               float(self.compile), float(self.phase_over)], dtype=torch.float64, device=d.device)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        sig, out_of_time, length, compile_, phase_over = shared.tolist()
        return Votes(bool(sig), bool(out_of_time), int(length), bool(compile_), bool(phase_over))
