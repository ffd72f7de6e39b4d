"""``train.batch_aug``: augmentations of whole batches on the device (MixUp and CutBlur for paired SR).

One augmentation (or none, with probability 1 - ``train.batch_aug_prob``) is drawn per step from a
generator seeded by (seed, step), like the GAN penalty's interpolation: a resumed run draws the same
ones. Under torchrun each process mixes within its share of the global batch.

- ``mixup``: lr = v lr + (1-v) lr[perm], hr likewise, v ~ Beta(1.2, 1.2) (the value the SR
  data-augmentation study used). Bicubic downscaling is linear, so the mixed LR is still the LR of
  the mixed HR: the pair stays consistent.
- ``cutblur``: a box covering ~70% of each side of the LR input is replaced by the HR's s x s
  average over the same place (HR detail on the LR grid), or the input becomes that average outside
  the box; the target stays HR. It teaches where the input is already sharp not to sharpen it
  again. Volumes (same grid, s = 1) paste the HR itself, as the original CutBlur does.
"""

from __future__ import annotations

import typing

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.config import BatchAugKind

BATCH_AUGMENTS = typing.get_args(BatchAugKind)
MIXUP_ALPHA = 1.2
CUTBLUR_SIDE = 0.7  # the box's share of each side (with a little jitter)


def _hr_on_lr_grid(lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """The HR averaged over each LR pixel's s x s (x s) block: (B,C,sH,sW) -> (B,C,H,W)."""
    scale = hr.shape[-1] // lr.shape[-1]
    if scale == 1:
        return hr
    pool = F.avg_pool3d if hr.dim() == 5 else F.avg_pool2d
    return pool(hr, scale)


class BatchAugment:
    """Draws and applies ``kinds`` to a step's (lr, hr) batch on the device."""

    def __init__(self, kinds: tuple[str, ...], prob: float, seed: int) -> None:
        unknown = [k for k in kinds if k not in BATCH_AUGMENTS]
        if unknown:
            raise ValueError(f"train.batch_aug: {unknown[0]!r} is not one of {', '.join(BATCH_AUGMENTS)}")
        self.kinds, self.prob, self.seed = kinds, prob, seed

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.kinds:
            return lr, hr
        rng = np.random.default_rng([self.seed % 2**63, step, 0xBA7C])
        if rng.random() >= self.prob:
            return lr, hr
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        if kind == "mixup":
            v = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
            perm = torch.from_numpy(rng.permutation(lr.shape[0])).to(lr.device)
            return torch.lerp(lr[perm], lr, v), torch.lerp(hr[perm], hr, v)  # v * a + (1 - v) * b
        return self._cutblur(lr, hr, rng), hr

    @staticmethod
    def _cutblur(lr: torch.Tensor, hr: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        sharp = _hr_on_lr_grid(lr, hr).to(lr.dtype)
        side = float(np.clip(rng.normal(CUTBLUR_SIDE, 0.01), 0.05, 1.0))
        box = []
        for n in lr.shape[2:]:  # one span per spatial axis
            length = max(1, round(n * side))
            start = int(rng.integers(0, n - length + 1))
            box.append(slice(start, start + length))
        region = (..., *box)
        if rng.random() < 0.5:  # HR detail inside the box
            out = lr.clone()
            out[region] = sharp[region]
        else:  # HR detail outside it
            out = sharp.clone()
            out[region] = lr[region]
        return out
