"""Training data of the train stage: patch pairs, their augmentation and the data order.

The data order is a pure function of (seed, epoch): epoch ``e`` visits the training patches in the
permutation drawn from ``default_rng([seed, e])``, and each visit carries its own sample seed drawn
from the same generator. Crops and dihedral transforms depend only on that sample seed, never on a
worker's RNG, so the batches are the same with 0 or 8 loader workers, and a resumed run can start
mid-epoch at the exact sample by skipping the steps it has already done.
"""

from __future__ import annotations

from collections.abc import Iterator

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.errors import DataError
from pipeline.images import ImageError, read_uint8
from pipeline.layout import Pair


def read_pair(pair: Pair, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(h,w,3) and (scale*h,scale*w,3) uint8 RGB; a size mismatch names both files."""
    lr, hr = read_uint8(pair.lr_path), read_uint8(pair.hr_path)
    if hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
        raise ImageError(f"{pair.hr_path}: HR is {hr.shape[1]}x{hr.shape[0]} but its LR {pair.lr_path} is "
                         f"{lr.shape[1]}x{lr.shape[0]}; expected {scale}x the LR size")
    return lr, hr


class PairAugment:
    """Random aligned crop, then one of the 8 dihedral transforms, applied identically to LR and HR.

    albumentations' D4 draws one group element per call and applies it to every image target,
    whatever its size, so the HR pixel block under each LR pixel moves with it. Its shape check
    is off because LR and HR differ in size by design. The crop is done here: albumentations
    would cut the same pixel window from both images, not the 4x window the HR needs.
    """

    def __init__(self, crop: int, scale: int, dihedral: bool) -> None:
        self.crop, self.scale = crop, scale
        transforms = [A.D4(p=1.0)] if dihedral else []
        self.dihedral = A.Compose(transforms, additional_targets={"hr": "image"}, is_check_shapes=False)

    def __call__(self, lr: np.ndarray, hr: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        if self.crop:
            h, w = lr.shape[:2]
            if self.crop > min(h, w):
                raise DataError(f"train.crop={self.crop} is larger than the {w}x{h} LR patches; "
                                f"use a crop <= {min(h, w)} or 0 for whole patches")
            y, x = (int(v) for v in rng.integers(0, (h - self.crop + 1, w - self.crop + 1)))
            s = self.scale
            lr = lr[y : y + self.crop, x : x + self.crop]
            hr = hr[s * y : s * (y + self.crop), s * x : s * (x + self.crop)]
        # Re-seeding makes the transform a function of the sample seed alone (not of call order).
        self.dihedral.set_random_seed(int(rng.integers(2**31)))
        out = self.dihedral(image=lr, hr=hr)
        return out["image"], out["hr"]


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # (H,W,3) -> (3,H,W) uint8


class PatchDataset(Dataset):
    """Augmented patch pairs as uint8 tensors; indexed by ``(patch index, sample seed)``.

    Pixels stay uint8 until they reach the device: a quarter of the bytes through the loader
    queues and the host-to-GPU copy.
    """

    def __init__(self, pairs: list[Pair], augment: PairAugment, scale: int) -> None:
        self.pairs, self.augment, self.scale = pairs, augment, scale

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        lr, hr = read_pair(self.pairs[index], self.scale)
        lr, hr = self.augment(lr, hr, seed)
        return _chw(lr), _chw(hr)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Global batches of one epoch, this process's share of each; resumable at any step.

    Global batch ``b`` of epoch ``e`` is ``perm_e[b*B:(b+1)*B]``; process ``rank`` of ``world``
    takes the ``rank``-th contiguous slice of B/world samples, so every process sees a different
    part of the same global batch and the union is what one process would have seen (the
    DistributedSampler contract, with the resume offset it lacks). The tail that does not fill a
    global batch is dropped, so all steps have the same batch size.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise DataError(f"train.batch_size={batch_size} is the global batch and must divide by the "
                            f"{world} processes")
        if n < batch_size:
            raise DataError(f"only {n} training patches for train.batch_size={batch_size}; lower the batch "
                            "size or cut more patches (smaller patch.stride)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = rank, world
        self.steps_per_epoch = n // batch_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        """The next iteration yields epoch ``epoch`` from its step ``start`` on."""
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation of the patches, one sample seed per position) of an epoch."""
        rng = np.random.default_rng([self.seed % 2**63, epoch])
        return rng.permutation(self.n), rng.integers(0, 2**31, size=self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, seeds = self.order(self.epoch)
        share = self.batch_size // self.world
        for step in range(self.start, self.steps_per_epoch):
            first = step * self.batch_size + self.rank * share
            yield [(int(perm[i]), int(seeds[i])) for i in range(first, first + share)]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start
