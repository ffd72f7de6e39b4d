"""``mri-evaluate``: masked PSNR / SSIM / NRMSE of SR volumes against their HR, with the baselines as rows.

For every volume of the SR folder (``--sr``, default ``<mri.dir>/sr/<run>``), named like its item:
the HR is the item's volume in ``mri_splits.csv`` (cropped to whole thick slices for thick-slice LR,
``degrade.crop_to_multiple``), the foreground mask and data range come from it
(``metrics.foreground_mask``, ``mri.mask_dilate``), and the SR and each baseline of
``mri_evaluate.baselines`` (the item's LR in ``<mri.dir>/lr`` interpolated onto the HR grid, rounded to
the LR file's dtype as a written SR volume is) are scored by ``metrics.score_volume``. Rows: one per
method and item, then one mean per method; written to ``--csv`` (default
``<mri.dir>/scores/<SR folder name>.csv``). The last line is ``PSNR <mean> SSIM <mean>`` of the SR.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.config import Config, MriConfig
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write
from pipeline.core.layout import VolumeLayout
from pipeline.core.metrics import summary_line

if TYPE_CHECKING:  # torch, pandas and the volume modules load in the functions that compute, after main's check
    import pandas as pd

    from pipeline.mri.volumes import Volume

COLUMNS = ["method", "item", "psnr", "ssim", "nrmse"]


def as_written(data: np.ndarray, like: Volume) -> np.ndarray:
    """``data`` rounded and clipped to ``like``'s stored dtype and back: what a written volume holds."""
    from pipeline.mri.volumes import to_stored

    return to_stored(data, like.dtype, like.slope, like.inter).astype(np.float64) * like.slope + like.inter


def score_items(root: Path, sr_files: dict[str, Path], method: str, baselines: tuple[str, ...], mri: MriConfig,
                ) -> pd.DataFrame:
    """Rows (method, item, psnr, ssim, nrmse) of every SR volume and of the baselines on the same items."""
    import pandas as pd

    from pipeline.mri.data import hr_reference
    from pipeline.mri.metrics import foreground_mask, score_volume
    from pipeline.mri.predict import grid_factors, interpolate
    from pipeline.mri.splits import read_splits
    from pipeline.mri.volumes import list_volumes, read_volume, volume_stem

    layout = VolumeLayout(root)
    baselines = tuple(b for b in baselines if b != method)  # sr/tricubic is its own row already
    splits = read_splits(root).set_index("item")
    lr_files = {volume_stem(p): p for p in list_volumes(layout.lr_dir)} if baselines else {}
    rows = []
    for item, sr_path in sorted(sr_files.items()):
        if item not in splits.index:
            raise UserError(f"{sr_path}: {item!r} is not an item of {layout.splits_csv}")
        row = splits.loc[item]
        hr = hr_reference(read_volume(root / row["path"], int(row["volume"]), mri.max_voxels).data, mri)
        sr = read_volume(sr_path, max_voxels=mri.max_voxels).data
        if sr.shape != hr.shape:
            raise UserError(f"{sr_path}: SR is {sr.shape} but its HR {row['path']} is {hr.shape} (after the LR "
                            f"grid's crop); was it made from this folder's LR?")
        try:
            mask = foreground_mask(hr, mri.mask_dilate)
            rows.append({"method": method, "item": item, **score_volume(sr, hr, mask)})
        except UserError as exc:  # the metric's own message names no file
            raise UserError(f"{root / row['path']}: {exc}") from None
        if not baselines:
            continue
        if item not in lr_files:
            raise UserError(f"{layout.lr_dir}: no LR volume for {item!r}; run mri-prepare again")
        lr = read_volume(lr_files[item], max_voxels=mri.max_voxels)  # once per item, for every baseline
        for name in baselines:
            base = as_written(interpolate(lr, grid_factors(mri), name).data, lr)
            rows.append({"method": name, "item": item, **score_volume(base, hr, mask)})
    return pd.DataFrame(rows, columns=COLUMNS)


def with_means(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` followed by one row per method: item 'mean', the mean of each score."""
    import pandas as pd

    means = table.groupby("method", sort=False)[["psnr", "ssim", "nrmse"]].mean().reset_index()
    means.insert(1, "item", "mean")
    return pd.concat([table, means], ignore_index=True)


def main(cfg: Config) -> None:
    root = Path(cfg.mri.dir)
    layout = VolumeLayout(root)
    sr_dir = Path(cfg.mri_evaluate.sr) if cfg.mri_evaluate.sr else layout.sr_dir(cfg.run)
    if not cfg.mri_evaluate.sr and not sr_dir.is_dir():
        raise UserError(f"{sr_dir}: not found; run `mri-infer run={cfg.run}` first, or name a folder with --sr")
    from pipeline.mri.volumes import list_volumes, volume_stem

    sr_files = {volume_stem(p): p for p in list_volumes(sr_dir)}
    from pipeline.mri.lrset import read_record  # pandas: once the SR folder is known good

    mri = read_record(root)
    scores = score_items(root, sr_files, sr_dir.name, cfg.mri_evaluate.baselines, mri)
    table = with_means(scores)
    csv = Path(cfg.mri_evaluate.csv) if cfg.mri_evaluate.csv else layout.scores_csv(sr_dir.name)
    with atomic_write(csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    print(f"{len(sr_files)} volume(s) of {sr_dir}, masked (Otsu foreground dilated {mri.mask_dilate} voxels)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"scores -> {csv}")
    print(summary_line(scores[scores["method"] == sr_dir.name]))
