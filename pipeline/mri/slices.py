"""Unpaired LR / HR slices for SRResCycGAN: 2-D crops cut from volumes, the LR by in-plane k-space cropping.

- ``slice_crops(volume, axis, size)``: the volume normalised with its own ``IntensityStats``, cut into
  slices along ``axis``, each slice into ``size`` x ``size`` crops on a grid flush with its edges
  (``tiling.tile_corners``; a slice smaller than ``size`` is zero-padded: MRI background is ~0);
  crops whose share of foreground (the volume's Otsu mask) is below ``min_foreground`` are dropped.
  The write-up's fastMRI knee slices are 320 x 320: one crop each.
- ``kspace_downsample(hr, scale)``: the LR of a crop as a scanner with fewer phase and frequency
  encodes sees it: the central 1/scale of the 2-D spectrum kept per axis, inverse transformed
  (magnitude, divided by scale^2 so intensities keep their level): 320 -> 80 as in the write-up.
- ``UnpairedSlices``: ``sample(i, seed)`` = (LR crop i, an HR crop drawn from the seed), each side
  flipped and turned by the seed, so the generators never see which HR belongs to an LR. ``unpaired_slices``
  builds one from volumes: subjects alternate between the LR side and the HR side (no subject on
  both), as an unpaired study has LR and HR scans of different people.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.core.errors import UserError
from pipeline.inference.tiling import tile_corners
from pipeline.mri.metrics import foreground_mask
from pipeline.mri.volumes import Volume, intensity_stats

MIN_FOREGROUND = 0.25  # share of a crop's pixels inside the anatomy for it to be a training sample


def slice_crops(volume: Volume, axis: int, size: int, min_foreground: float = MIN_FOREGROUND) -> np.ndarray:
    """(n, size, size) float32 normalised crops of every slice of ``volume`` along ``axis``."""
    data = intensity_stats(volume.data, path=volume.path).normalise(volume.data)
    mask = foreground_mask(volume.data, dilate=0)
    data, mask = np.moveaxis(data, axis, 0), np.moveaxis(mask, axis, 0)  # (X,Y,Z) -> (S,h,w): slices first
    s, h, w = data.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:  # (S,h,w) -> (S,max(h,size),max(w,size)), zeros after the anatomy
        data = np.pad(data, ((0, 0), (0, ph), (0, pw)))
        mask = np.pad(mask, ((0, 0), (0, ph), (0, pw)))
    crops = []
    for y, x in tile_corners(data.shape[1:], size, size):
        keep = mask[:, y:y + size, x:x + size].mean(axis=(1, 2)) >= min_foreground
        crops.append(data[keep, y:y + size, x:x + size])
    return np.concatenate(crops).astype(np.float32)


def kspace_downsample(hr: np.ndarray, scale: int) -> np.ndarray:
    """(..., H, W) -> (..., H/scale, W/scale): the central part of the 2-D spectrum, magnitude / scale^2."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise UserError(f"slice {h}x{w} does not divide by the scale {scale}")
    spectrum = np.fft.fftshift(np.fft.fft2(hr.astype(np.float64)), axes=(-2, -1))  # DC in the centre
    lh, lw = h // scale, w // scale
    top, left = h // 2 - lh // 2, w // 2 - lw // 2  # DC (index n//2 after the shift) lands on index l//2
    centre = spectrum[..., top:top + lh, left:left + lw]  # (..., H, W) -> (..., H/s, W/s)
    lr = np.fft.ifft2(np.fft.ifftshift(centre, axes=(-2, -1)))
    return (np.abs(lr) / scale**2).astype(np.float32)


def _dihedral(x: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """``x`` (h,w) flipped and turned by draws of ``rng`` -> (1,h,w)."""
    if rng.random() < 0.5:
        x = x[::-1]
    x = np.rot90(x, int(rng.integers(4)))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]  # (h,w) -> (1,h,w)


class UnpairedSlices:
    """LR (1,h,w) and HR (1,sh,sw) float32 crops by ``sample(index, seed)``; an LR's HR partner is drawn per sample."""

    def __init__(self, lr: np.ndarray, hr: np.ndarray) -> None:
        if len(lr) == 0 or len(hr) == 0:
            raise UserError(f"unpaired slices need crops on both sides, got {len(lr)} LR and {len(hr)} HR")
        self.lr, self.hr = lr, hr

    def __len__(self) -> int:
        return max(len(self.lr), len(self.hr))

    def sample(self, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(LR (1,h,w), HR (1,sh,sw)) of item ``i`` as a function of ``seed`` alone (the train stage's (index,
        seed) order, so resumes are exact): the HR partner, then each side's flip and 90-degree turn, from the seed."""
        rng = np.random.default_rng(seed)
        hr = self.hr[int(rng.integers(len(self.hr)))]
        return _dihedral(self.lr[i % len(self.lr)], rng), _dihedral(hr, rng)


def unpaired_slices(volumes: Sequence[tuple[str, Volume]], size: int, scale: int = 4, axis: int = 2,
                    min_foreground: float = MIN_FOREGROUND) -> UnpairedSlices:
    """``UnpairedSlices`` from (subject, HR volume) pairs: subjects alternate LR side / HR side, in sorted order."""
    subjects = sorted({s for s, _ in volumes})
    if len(subjects) < 2:
        raise UserError(f"unpaired slices need at least two subjects (one per side), got {subjects}")
    lr_side = set(subjects[0::2])
    lr_crops = [slice_crops(v, axis, size, min_foreground) for s, v in volumes if s in lr_side]
    hr_crops = [slice_crops(v, axis, size, min_foreground) for s, v in volumes if s not in lr_side]
    lr = kspace_downsample(np.concatenate(lr_crops), scale)
    return UnpairedSlices(lr, np.concatenate(hr_crops))
