"""A prepared volume folder (``VolumeLayout``): its LR set, the record of how it was made, its items.

- ``write_lr_folder``: one LR volume per item of the split table into ``<root>/lr/<item><suffix>``
  by ``mri.degradation``, in the HR file's format, dtype and scaling: k-space truncation on the
  same grid (same affine) or thick slices on the coarser grid (``degrade.thick_affine``); the
  folder is built beside its place and swapped in whole (``files.staged_dir``), with
  ``lr/degradation.yaml``, the ``mri`` settings that made it, which later stages read (``read_record``)
  instead of trusting their own config to describe the LR grid.
- ``lr_items``: (item, LR path) of the validation fold or of every item.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.config import Config, MriConfig, load_config, save_config
from pipeline.core.errors import UserError
from pipeline.core.files import staged_dir
from pipeline.core.layout import VolumeLayout
from pipeline.mri.degrade import make_lr, thick_affine
from pipeline.mri.splits import read_splits
from pipeline.mri.volumes import VOLUME_SUFFIXES, Volume, read_volume, write_volume

if TYPE_CHECKING:
    import pandas as pd


def suffix_of(path: str | Path) -> str:
    """The volume suffix of a file name (``.nii.gz``, ``.nii`` or ``.npy``)."""
    return next(s for s in VOLUME_SUFFIXES if str(path).lower().endswith(s))


def lr_volume(hr: Volume, mri: MriConfig) -> tuple[np.ndarray, np.ndarray]:
    """(LR voxels, LR affine) of an HR volume under ``mri.degradation``."""
    lr = make_lr(hr.data, mri)
    affine = thick_affine(hr.affine, mri.thick_factor, mri.thick_axis) if mri.degradation == "thick" else hr.affine
    return lr, affine


def write_lr_folder(root: Path, table: pd.DataFrame, cfg: Config) -> Path:
    """Every item's LR volume by ``cfg.mri`` into ``<root>/lr`` (staged), with the record of the settings."""
    layout = VolumeLayout(root)
    mri = cfg.mri
    with staged_dir(layout.lr_dir, layout.lr_record.name) as stage:
        for row in table.itertuples():
            hr = read_volume(root / row.path, int(row.volume), mri.max_voxels)
            try:
                lr, affine = lr_volume(hr, mri)
            except UserError as exc:  # the degradation's own message names no file
                raise type(exc)(f"{hr.path}: {exc}") from None
            write_volume(stage / layout.lr_name(row.item, suffix_of(row.path)), lr, hr, affine)
        save_config(cfg, stage / layout.lr_record.name, sections=("mri",))
    return layout.lr_dir


def read_record(root: str | Path) -> MriConfig:
    """The ``mri`` settings that made ``<root>/lr`` (its ``degradation.yaml``)."""
    layout = VolumeLayout(Path(root))
    layout.need_record()
    return load_config(layout.lr_record).mri


def lr_items(root: str | Path, split: str, val_fold: int) -> list[tuple[str, Path]]:
    """(item, LR path) of the validation fold (``split='val'``) or of every item, from mri_splits.csv."""
    root = Path(root)
    layout = VolumeLayout(root)
    table = read_splits(root)
    if split == "val":
        table = table[table["fold"] == val_fold]
        if table.empty:
            raise UserError(f"{layout.splits_csv}: no item in the validation fold mri.val_fold={val_fold}")
    items = []
    for row in table.sort_values("item").itertuples():
        path = layout.lr_dir / layout.lr_name(row.item, suffix_of(row.path))
        if not path.is_file():
            raise UserError(f"{path}: LR volume not found; run mri-prepare again (the folder changed since)")
        items.append((row.item, path))
    return items
