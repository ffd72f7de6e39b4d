"""Training and validation data of same-grid volume models (mDCSRN) from a prepared volume folder.

- ``load_pairs(root, items, mri)``: per item of ``mri_splits.csv``, its LR (``<root>/lr``, by the
  recorded degradation) and HR, both normalised with the LR's ``IntensityStats`` (the statistics
  inference uses: only the LR is known then), HR cropped to whole thick slices, and the HR's
  foreground mask. K-space LR is already on the HR grid; thick-slice LR stays on its grid and is
  interpolated per sample (below).
- ``PatchDataset(pairs, size, stride)``: cubic patches on a grid over each volume (overlapping when
  ``stride < size``; an axis shorter than ``size`` is mirrored up to it at its far end, so every
  patch has one shape and batches stack; the mirrored voxels count as background), only those with at least
  ``min_foreground`` of their voxels in the mask. ``sample(i, seed)`` (the train stage's form, mri-train,
  through ``SeededSamples``) = patch i as (LR, HR) (1,s,s,s) tensors: thick-slice LR brought to the HR
  grid by an interpolation (nearest / linear / cubic, ``mri.interp``: mDCSRN's augmentation), then the
  same random flips per axis and 90-degree rotation in the plane of axes 0 and 1 (where voxels are
  usually square) on both, all drawn from the one sample seed, so a sample is a function of (index,
  seed) alone and resumes are exact.
- ``validation_items`` / ``score_volumes``: the validation fold's LR volumes and HR references, and the
  masked PSNR / SSIM / NRMSE of a model on them in real-world units (``predict.super_resolve``,
  ``metrics.score_volume``): the numbers mri-evaluate reports, before the integer rounding of a
  written file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.core.config import MriConfig
from pipeline.core.errors import UserError
from pipeline.core.layout import VolumeLayout
from pipeline.inference.tiling import tile_corners
from pipeline.mri.degrade import INTERPOLATIONS, crop_to_multiple, to_grid
from pipeline.mri.lrset import suffix_of
from pipeline.mri.metrics import foreground_mask, score_volume
from pipeline.mri.models import VolumeModelSpec
from pipeline.mri.predict import VolumeSettings, grid_factors, super_resolve
from pipeline.mri.splits import read_splits
from pipeline.mri.volumes import Volume, intensity_stats, read_volume

_MRI = MriConfig()  # the defaults live in the config schema, one place
_SETTINGS = VolumeSettings()
MIN_FOREGROUND = 0.1  # share of a patch's voxels inside the anatomy for it to be a training sample


def hr_reference(hr: np.ndarray, mri: MriConfig) -> np.ndarray:
    """The HR an SR volume is scored against: whole thick slices only, for thick-slice LR."""
    return crop_to_multiple(hr, mri.thick_factor, mri.thick_axis) if mri.degradation == "thick" else hr


@dataclass(frozen=True)
class VolumePair:
    """One item's normalised LR (its own grid) and HR (the HR grid), and the HR foreground mask."""

    item: str
    lr: np.ndarray  # (x,y,z) float32, normalised with the LR's statistics
    hr: np.ndarray  # (X,Y,Z) float32, same normalisation
    mask: np.ndarray  # (X,Y,Z) bool


@dataclass(frozen=True)
class ValItem:
    """A validation volume: the LR as read (units, affine), the HR reference in real-world units, its mask."""

    item: str
    lr: Volume
    hr: np.ndarray
    mask: np.ndarray


def _rows(root: Path, items: list[str] | None, fold: int | None = None) -> pd.DataFrame:
    table = read_splits(root)
    if items is not None:
        missing = sorted(set(items) - set(table["item"]))
        if missing:
            raise UserError(f"{VolumeLayout(root).splits_csv}: no item {missing[0]!r}")
        table = table[table["item"].isin(items)]
    if fold is not None:
        table = table[table["fold"] == fold]
    if table.empty:
        raise UserError(f"{VolumeLayout(root).splits_csv}: no item in fold {fold}")
    return table.sort_values("item")


def _read_pair(root: Path, row: object, mri: MriConfig) -> tuple[Volume, np.ndarray]:
    """(LR volume as read, HR reference in real-world units) of one split row."""
    layout = VolumeLayout(root)
    lr = read_volume(layout.lr_dir / layout.lr_name(row.item, suffix_of(row.path)), max_voxels=mri.max_voxels)
    hr = hr_reference(read_volume(root / row.path, int(row.volume), mri.max_voxels).data, mri)
    expected = tuple(n * f for n, f in zip(lr.data.shape, grid_factors(mri)))
    if hr.shape != expected:
        raise UserError(f"{lr.path}: LR {lr.data.shape} does not fit HR {hr.shape}; run mri-prepare again")
    return lr, hr


def load_pairs(root: str | Path, mri: MriConfig, items: list[str] | None = None,
               exclude_fold: int | None = None) -> list[VolumePair]:
    """Normalised pairs of ``items`` (default: every item outside ``exclude_fold``) of a prepared folder."""
    root = Path(root)
    table = _rows(root, items)
    if exclude_fold is not None:
        table = table[table["fold"] != exclude_fold]
    pairs = []
    for row in table.itertuples():
        lr, hr = _read_pair(root, row, mri)
        stats = intensity_stats(lr.data, mri.norm_percentiles, lr.path)
        pairs.append(VolumePair(row.item, stats.normalise(lr.data), stats.normalise(hr),
                                foreground_mask(hr, mri.mask_dilate)))
    return pairs


def _mirror(x: np.ndarray, size: int, mode: str = "symmetric") -> np.ndarray:
    """``x`` with every axis shorter than ``size`` extended to it at its far end (mirrored, or zeros)."""
    pad = [(0, max(0, size - n)) for n in x.shape]
    return np.pad(x, pad, mode=mode) if any(p for _, p in pad) else x  # (x,y,z) -> (max(x,s),max(y,s),max(z,s))


def _box(corner: tuple[int, ...], size: int) -> tuple[slice, ...]:
    return tuple(slice(c, c + size) for c in corner)


class PatchDataset:
    """Foreground patches of volume pairs, drawn by ``sample(index, seed)`` (module docstring)."""

    def __init__(self, pairs: list[VolumePair], size: int, stride: int, mri: MriConfig = _MRI,
                 min_foreground: float = MIN_FOREGROUND, augment: bool = True) -> None:
        unknown = [m for m in mri.interp if m not in INTERPOLATIONS]
        if unknown or not mri.interp:
            raise UserError(f"mri.interp={list(mri.interp)}: choose from {', '.join(INTERPOLATIONS)}")
        self.mri, self.augment, self.size = mri, augment, size
        self.pairs = [VolumePair(p.item, p.lr if p.lr.shape != p.hr.shape else _mirror(p.lr, size), _mirror(p.hr, size),
                                 _mirror(p.mask, size, "constant")) for p in pairs]
        self.index: list[tuple[int, tuple[int, ...]]] = []  # (pair, patch corner)
        for k, pair in enumerate(self.pairs):
            for c in tile_corners(pair.hr.shape, size, stride):
                if pair.mask[_box(c, size)].mean() >= min_foreground:
                    self.index.append((k, c))
        if not self.index:
            raise UserError(f"no {size}^3 patch holds {min_foreground:.0%} foreground in {len(pairs)} volume(s)")
        self._by_method: dict[tuple[int, str], np.ndarray] = {}  # (pair, interpolation) -> LR on the HR grid

    def lr_by(self, k: int, method: str) -> np.ndarray:
        """Pair ``k``'s LR on the (mirrored) HR grid by interpolation ``method`` (k-space LR: as is), cached."""
        pair = self.pairs[k]
        if pair.lr.shape == pair.hr.shape:
            return pair.lr
        if (k, method) not in self._by_method:
            hr_shape = [n * f for n, f in zip(pair.lr.shape, grid_factors(self.mri))]
            self._by_method[k, method] = _mirror(to_grid(pair.lr, hr_shape, INTERPOLATIONS[method]), self.size)
        return self._by_method[k, method]

    def __len__(self) -> int:
        return len(self.index)

    def _crop(self, k: int, corner: tuple[int, ...], lr_volume: np.ndarray,
              rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        box = _box(corner, self.size)
        lr, hr = lr_volume[box], self.pairs[k].hr[box]
        if rng is not None:
            flips = tuple(a for a in range(3) if rng.random() < 0.5)
            turns = int(rng.integers(4))
            lr, hr = (np.rot90(np.flip(v, flips), turns, axes=(0, 1)) for v in (lr, hr))
        # (s,s,s) -> (1,s,s,s): one channel
        return (torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32))[None],
                torch.from_numpy(np.ascontiguousarray(hr, dtype=np.float32))[None])

    def sample(self, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(LR, HR) (1,s,s,s) of patch ``i`` as a function of ``seed`` alone (the train stage's (index, seed)
        order, so resumes are exact): the interpolation of thick-slice LR, then the flips and rotation."""
        k, corner = self.index[i]
        rng = np.random.default_rng(seed)
        method = str(rng.choice(list(self.mri.interp)))
        return self._crop(k, corner, self.lr_by(k, method), rng if self.augment else None)


class SeededSamples(Dataset):
    """The train stage's dataset: key ``(index, seed)`` -> ``source.sample(index, seed)`` (``PatchDataset``,
    ``slices.UnpairedSlices``): (LR, HR) tensors that depend on the key alone."""

    def __init__(self, source: PatchDataset | Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.sample(*key)


def validation_items(root: str | Path, mri: MriConfig, val_fold: int) -> list[ValItem]:
    """The LR volumes, HR references and masks of fold ``val_fold`` (``mri``: the LR set's record)."""
    root = Path(root)
    out = []
    for row in _rows(root, None, val_fold).itertuples():
        lr, hr = _read_pair(root, row, mri)
        out.append(ValItem(row.item, lr, hr, foreground_mask(hr, mri.mask_dilate)))
    return out


def score_volumes(model: nn.Module, spec: VolumeModelSpec, items: list[ValItem], mri: MriConfig,
             settings: VolumeSettings = _SETTINGS, device: torch.device | None = None) -> pd.DataFrame:
    """item, psnr, ssim, nrmse of ``model`` on every validation item (masked, real-world units)."""
    rows = []
    for v in items:
        sr = super_resolve(model, spec, v.lr, settings, grid_factors(mri), device, mri.norm_percentiles)
        rows.append({"item": v.item, **score_volume(sr.data, v.hr, v.mask)})
    return pd.DataFrame(rows, columns=["item", "psnr", "ssim", "nrmse"])
