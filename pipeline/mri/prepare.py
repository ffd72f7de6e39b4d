"""``mri-prepare``: a folder of HR volumes -> ``mri_splits.csv`` (folds by subject) and the LR volumes.

Reads every volume of ``mri.dir`` (``mri.volume4d``: one item per file, or per volume of a 4-D scan),
assigns whole subjects to ``mri.folds`` folds (``splits.build_splits``, seeded by ``seed``), and
writes one LR volume per item by ``mri.degradation`` into ``<mri.dir>/lr/<item><suffix>`` in the HR
file's format, dtype and scaling: k-space truncation on the same grid (same affine), or thick
slices on the coarser grid (``degrade.thick_affine``). ``lr/degradation.yaml`` records the ``mri``
settings that made them: ``mri-infer`` and ``mri-evaluate`` read the LR grid from it, not from
their own config. The LR folder is built beside its place and swapped in whole
(``files.staged_dir``): a failed run leaves the previous one as it was.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.layout import VolumeLayout
from pipeline.core.locks import data_lock
from pipeline.mri.lrset import write_lr_folder
from pipeline.mri.splits import build_splits, write_splits


def main(cfg: Config) -> None:
    root = Path(cfg.mri.dir)
    with data_lock(root, "mri-prepare"):  # mri_splits.csv and lr/ are one set, made by one process
        _prepare(cfg, root)


def _prepare(cfg: Config, root: Path) -> None:
    start = time.perf_counter()
    table = build_splits(root, cfg.mri.folds, cfg.seed, cfg.mri.subject_pattern, cfg.mri.volume4d)
    write_splits(root, table)
    out = write_lr_folder(root, table, cfg)
    folds = table.groupby("fold")["subject"].nunique().to_dict()
    how = (f"k-space keep {cfg.mri.kspace_keep}" if cfg.mri.degradation == "kspace"
           else f"thick slices x{cfg.mri.thick_factor} along axis {cfg.mri.thick_axis}")
    print(f"{len(table)} item(s) of {table['subject'].nunique()} subject(s) in {cfg.mri.folds} folds "
          f"(subjects per fold: {folds}) -> {VolumeLayout(root).splits_csv}")
    print(f"LR by {how} -> {out}  ({time.perf_counter() - start:.1f} s)")
