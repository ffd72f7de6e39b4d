"""Several processes under ``torchrun``: where this one sits, and the few collectives stages use.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here is the single-process
case: rank 0 of 1, collectives return their input. Under torchrun, GPUs talk over NCCL and CPU
processes over gloo; the process group is opened once per stage by ``init_distributed`` and
closed by ``shutdown``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.core.runtime import pick_device


@dataclass(frozen=True)
class Dist:
    """Where this process sits among the stage's processes (rank 0 of 1 without torchrun)."""

    rank: int
    world: int
    device: torch.device
    distributed: bool = False  # a process group exists (any torchrun launch, even of one process)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(deterministic: bool = False) -> Dist:
    """Open the process group when started by torchrun; pick this process's device."""
    if deterministic:
        # cuBLAS reads this at its first call to pick deterministic kernels.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device()  # the LOCAL_RANK-th GPU under torchrun
    # Under torchrun even one process joins a group, so one GPU runs the code path of many.
    if (world > 1 or dist.is_torchelastic_launched()) and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return Dist(0, 1, device)
    return Dist(dist.get_rank(), dist.get_world_size(), device, distributed=True)


def shutdown(d: Dist) -> None:
    if d.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()


def broadcast(d: Dist, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if d.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(d: Dist, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (any picklable object)."""
    if d.world == 1:
        return [value]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, value)
    return out


def wrap_ddp(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """``module`` with its gradients averaged across the ranks in buckets during backward (NCCL on GPUs,
    gloo on CPUs); the module itself without a process group."""
    if not d.distributed:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda"
                                                     else None)
