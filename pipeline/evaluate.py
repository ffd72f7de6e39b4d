"""``evaluate``: PSNR, SSIM and NRMSE of predictions against ground truth, per image and the mean.

Protocols (both through basicsr's ``calculate_psnr`` / ``calculate_ssim``, the field's reference):
- ``competition``: RGB uint8, whole image, PSNR = 10 log10(255^2 / MSE) per image, then the mean
  over images (the contest metric); SSIM is basicsr's on RGB (the mean of the three channels).
- ``paper``: the SR literature's protocol: the Y channel of BT.601 YCbCr (basicsr's
  ``bgr2ycbcr``, so images are handed over in its BGR order) with ``data.scale`` pixels cropped
  at every border (``test_y_channel=True, crop_border=scale``).
NRMSE is sqrt(MSE) / 255 over the same pixels as the PSNR (the RMSE as a fraction of the 8-bit
range; 10^(-PSNR/20), so 0 for identical images). Its mean over images weighs bad images more
than the mean PSNR does. It is not scikit-image's default NRMSE (which divides by the norm of the
ground truth).
Beside them, on the whole RGB image whatever the protocol (pipeline.perceptual.ImageQuality):
``sharpness``, the Laplacian energy of the prediction over the ground truth's (1 = as much fine detail,
below = smoother), and ``lpips`` when ``evaluate.lpips_weights`` names the backbone's torchvision
weights file (otherwise the column says what is missing).

Folders are matched by file stem; a missing, extra or size-mismatched file is an error naming it.
The output ends with a line ``PSNR <mean> SSIM <mean>``; ``--csv`` writes the per-image table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.images import atomic_write, images_by_stem, read_uint8
from pipeline.perceptual import ImageQuality

PROTOCOLS = ("competition", "paper")
COLUMNS = ["name", "psnr", "ssim", "nrmse", "sharpness", "lpips"]


def score_pair(sr: np.ndarray, hr: np.ndarray, protocol: str = "competition", scale: int = 4) -> dict[str, float]:
    """PSNR, SSIM and NRMSE of one (H,W,3) uint8 RGB prediction against its ground truth."""
    from pipeline.compat import calculate_psnr, calculate_ssim

    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose {' or '.join(PROTOCOLS)}")
    if sr.shape != hr.shape:
        raise UserError(f"prediction {sr.shape} and ground truth {hr.shape} differ in size")
    if protocol == "competition":
        kw = {"crop_border": 0, "input_order": "HWC", "test_y_channel": False}
        a, b = sr, hr
    else:
        kw = {"crop_border": scale, "input_order": "HWC", "test_y_channel": True}
        a, b = sr[:, :, ::-1], hr[:, :, ::-1]  # RGB -> BGR, the order basicsr's Y conversion expects
    psnr = float(calculate_psnr(a, b, **kw))
    ssim = float(calculate_ssim(a, b, **kw))
    nrmse = 0.0 if math.isinf(psnr) else 10 ** (-psnr / 20)  # = sqrt(MSE) / 255 on the scored pixels
    return {"psnr": psnr, "ssim": ssim, "nrmse": nrmse}


def match_folders(sr_dir: str | Path, hr_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """(stem, SR path, HR path) for every stem; the two folders must hold exactly the same stems."""
    sr, hr = images_by_stem(sr_dir, "prediction"), images_by_stem(hr_dir, "ground-truth")
    missing = sorted(set(hr) - set(sr))
    extra = sorted(set(sr) - set(hr))
    if missing:
        raise UserError(f"{sr_dir}: no prediction for {hr[missing[0]].name}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise UserError(f"{sr[extra[0]]}: no ground truth with this name in {hr_dir}"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return [(s, sr[s], hr[s]) for s in sorted(sr)]


def evaluate_pairs(pairs: Iterable[tuple[str, Path, Path]], protocol: str = "competition", scale: int = 4,
                   quality: ImageQuality | None = None) -> pd.DataFrame:
    """One row per (name, SR path, HR path): name, psnr, ssim, nrmse, sharpness, lpips."""
    quality = quality or ImageQuality()
    rows = []
    for name, sr_path, hr_path in pairs:
        sr, hr = read_uint8(sr_path), read_uint8(hr_path)
        if sr.shape != hr.shape:
            raise UserError(f"{sr_path}: prediction is {sr.shape[1]}x{sr.shape[0]} but {hr_path} is "
                            f"{hr.shape[1]}x{hr.shape[0]}")
        rows.append({"name": name, **score_pair(sr, hr, protocol, scale), **quality(sr, hr)})
    return pd.DataFrame(rows, columns=COLUMNS)


def evaluate_folders(sr_dir: str | Path, hr_dir: str | Path, protocol: str = "competition", scale: int = 4,
                     quality: ImageQuality | None = None) -> pd.DataFrame:
    """Per-image scores of every prediction in ``sr_dir`` against the same stem in ``hr_dir``."""
    return evaluate_pairs(match_folders(sr_dir, hr_dir), protocol, scale, quality)


def mean_row(table: pd.DataFrame) -> list[object]:
    """The table's last row: the mean of every numeric column; a text column (a missing metric) keeps its text."""
    return ["mean", *(table[c].mean() if pd.api.types.is_numeric_dtype(table[c]) else table[c].iloc[0]
                      for c in table.columns[1:])]


def summary_line(table: pd.DataFrame) -> str:
    """``PSNR <mean> SSIM <mean>``: the last line of the stage's output."""
    return f"PSNR {table['psnr'].mean():.4f} SSIM {table['ssim'].mean():.4f}"


def main(cfg: Config) -> None:
    ev = cfg.evaluate
    if not ev.sr or not ev.hr:
        raise UserError("evaluate needs --sr DIR (predictions) and --hr DIR (ground truth)")
    table = evaluate_folders(ev.sr, ev.hr, ev.protocol, cfg.data.scale, ImageQuality(ev.lpips_weights, ev.lpips_net))
    if ev.csv:
        with atomic_write(ev.csv) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
    shown = table.copy()
    shown.loc[len(shown)] = mean_row(table)
    print(f"protocol: {ev.protocol}" + (f" (Y channel, {cfg.data.scale}-px border cropped)"
                                        if ev.protocol == "paper" else " (RGB uint8)"))
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if ev.csv:
        print(f"per-image scores -> {ev.csv}")
    print(summary_line(table))
