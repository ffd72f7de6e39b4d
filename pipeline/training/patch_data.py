"""The image task's training data: patch pairs and their augmentation, by (index, sample seed).

Crops and dihedral transforms depend only on the sample seed that the data order
(``pipeline.training.loader.EpochBatches``) gives each visit, never on a worker's RNG, so the
batches are the same with 0 or 8 loader workers and a resumed run continues at the exact sample.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import DataError
from pipeline.core.images import ImageError, read_uint8
from pipeline.core.layout import Pair


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
