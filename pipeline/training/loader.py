"""The training loader: the data order and one loader iterator for a whole training session.

The data order is a pure function of (seed, epoch): epoch ``e`` visits the training samples in the
permutation drawn from ``default_rng([seed, e])``, and each visit carries its own sample seed drawn
from the same generator. A task's dataset takes ``(index, sample seed)`` keys and derives crops and
transforms from the seed alone, so the batches are the same with 0 or 8 loader workers, and a
resumed run starts mid-epoch at the exact sample by skipping the steps it has already done.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.core.config import Config
from pipeline.core.distributed import Dist
from pipeline.core.errors import DataError


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Global batches of one epoch, this process's share of each; resumable at any step.

    Global batch ``b`` of epoch ``e`` is ``perm_e[b*B:(b+1)*B]``; process ``rank`` of ``world``
    takes the ``rank``-th contiguous slice of B/world samples, so every process sees a different
    part of the same global batch and the union is what one process would have seen (the
    DistributedSampler contract, with the resume offset it lacks). The tail that does not fill a
    global batch is dropped, so all steps have the same batch size.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, stream: int = 0) -> None:
        if batch_size % world:
            raise DataError(f"train.batch_size={batch_size} is the global batch and must divide by the "
                            f"{world} processes")
        if n < batch_size:
            raise DataError(f"only {n} training patches for train.batch_size={batch_size}; lower the batch "
                            "size or cut more patches (smaller patchify.stride)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.stream = stream  # phase k of train.phases draws its own orders (0: the run's first, or only, phase)
        self.steps_per_epoch = n // batch_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        """The next iteration yields epoch ``epoch`` from its step ``start`` on."""
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation of the patches, one sample seed per position) of an epoch."""
        rng = np.random.default_rng([self.seed % 2**63, epoch, *([self.stream] if self.stream else [])])
        return rng.permutation(self.n), rng.integers(0, 2**31, size=self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, seeds = self.order(self.epoch)
        share = self.batch_size // self.world
        for step in range(self.start, self.steps_per_epoch):
            first = step * self.batch_size + self.rank * share
            yield [(int(perm[i]), int(seeds[i])) for i in range(first, first + share)]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start


class RunBatches(Sampler[list[tuple[int, int]]]):
    """EpochBatches' batches from its current position on, epoch after epoch, without end.

    One loader iterator then serves a whole training session: its workers start once, keep
    prefetching across epoch ends, and stop when the loop drops the iterator. The order is still
    EpochBatches' (a function of seed, epoch and step), so resumes stay exact.
    """

    def __init__(self, epochs: EpochBatches) -> None:
        self.epochs = epochs

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epochs.epoch, self.epochs.start
        while True:
            self.epochs.set_position(epoch, start)
            yield from iter(self.epochs)
            epoch, start = epoch + 1, 0


def _own_process_group(_worker_id: int) -> None:
    # Ctrl-C (and `kill -- -PGID`) signal the terminal's whole process group. Loader workers leave
    # it, so only the main process hears the signal: it saves, then stops them. They keep the
    # default SIGTERM action, so nothing else changes: dying with the main process, exit handlers.
    os.setpgid(0, 0)


def run_loader(dataset: Dataset, cfg: Config, d: Dist, stream: int = 0) -> tuple[DataLoader, EpochBatches]:
    """The training loader of a task whose ``dataset`` takes (index, sample seed) keys, and its epoch order
    (``stream``: the phase of train.phases it serves)."""
    t = cfg.train
    batches = EpochBatches(len(dataset), t.batch_size, cfg.seed, d.rank, d.world, stream)  # type: ignore[arg-type]
    # The loader's own generator keeps it off the global torch RNG (which a resume restores and
    # drop-path layers use); the data order comes from `batches` alone, whatever the worker count.
    # The sampler never ends (RunBatches), so the loop's one iterator keeps its workers for the
    # session; pinned batches let the copy to the GPU run asynchronously.
    loader = DataLoader(dataset, batch_sampler=RunBatches(batches), num_workers=t.workers,
                        pin_memory=d.device.type == "cuda", worker_init_fn=_own_process_group,
                        prefetch_factor=t.prefetch if t.workers else None, generator=torch.Generator())
    return loader, batches
