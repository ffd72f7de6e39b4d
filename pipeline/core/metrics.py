"""The per-image metrics every stage reports (one PSNR for the whole project), through basicsr.

Protocols:
- ``competition``: RGB uint8, whole image, PSNR = 10 log10(255^2 / MSE) per image (the contest
  metric; a table's mean is the mean over images); SSIM is basicsr's on RGB (the mean of the
  three channels).
- ``paper``: the SR literature's protocol: the Y channel of BT.601 YCbCr (basicsr's
  ``bgr2ycbcr``, so images are handed over in its BGR order) with ``scale`` pixels cropped at
  every border (``test_y_channel=True, crop_border=scale``).
NRMSE is sqrt(MSE) / 255 over the same pixels as the PSNR (the RMSE as a fraction of the 8-bit
range; 10^(-PSNR/20), so 0 for identical images). It is not scikit-image's default NRMSE (which
divides by the norm of the ground truth).

``contest_psnr`` is the competition PSNR of one image computed with torch on the device the
prediction is on (the train stage's validation: no copy to the host); it equals ``score_pair``'s
(basicsr's) competition PSNR (tests/test_metrics.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.core.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

PROTOCOLS = ("competition", "paper")


def contest_psnr(sr: torch.Tensor, hr: torch.Tensor) -> float:
    """The contest metric of one image: ``sr`` (3,H,W) float in [0,1], ``hr`` (3,H,W) uint8.

    The prediction is rounded to uint8 once, as a PNG submission would be, then
    PSNR = 10 log10(255^2 / MSE) over all pixels and channels.
    """
    pred = sr.float().clamp(0, 1).mul(255).round().double()
    mse = (pred - hr.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def score_pair(sr: np.ndarray, hr: np.ndarray, protocol: str = "competition", scale: int = 4) -> dict[str, float]:
    """PSNR, SSIM and NRMSE of one (H,W,3) uint8 RGB prediction against its ground truth."""
    from pipeline.core.compat import calculate_psnr, calculate_ssim

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


def summary_line(table: pd.DataFrame) -> str:
    """``PSNR <mean> SSIM <mean>`` over ``table``'s rows: the last line of evaluate and mri-evaluate."""
    return f"PSNR {table['psnr'].mean():.4f} SSIM {table['ssim'].mean():.4f}"
