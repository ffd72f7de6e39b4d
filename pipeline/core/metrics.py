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

``paired_gain`` says whether a difference between two methods scored on the same images is real:
the mean per-image PSNR gain of one over the other with a paired bootstrap 95% interval (images
resampled with replacement, the same images for both methods, percentile interval). Every table that
compares methods (leaderboard, ablation, blend, ``evaluate --vs``) reports it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.errors import UserError

if TYPE_CHECKING:  # torch only for contest_psnr's tensors, which it handles through their methods
    import pandas as pd
    import torch
    from numpy.typing import ArrayLike

PROTOCOLS = ("competition", "paper")


def contest_psnr(sr: torch.Tensor, hr: torch.Tensor) -> float:
    """The contest metric of one image: ``sr`` (3,H,W) float in [0,1], ``hr`` (3,H,W) uint8.

    The prediction is rounded to uint8 once, as a PNG submission would be, then
    PSNR = 10 log10(255^2 / MSE) over all pixels and channels.
    """
    pred = sr.float().clamp(0, 1).mul(255).round().double()
    mse = (pred - hr.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def _basicsr_args(sr: np.ndarray, hr: np.ndarray, protocol: str, scale: int,
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """The two images and basicsr's keyword arguments for ``protocol``."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose {' or '.join(PROTOCOLS)}")
    if sr.shape != hr.shape:
        raise UserError(f"prediction {sr.shape} and ground truth {hr.shape} differ in size")
    if protocol == "competition":
        return sr, hr, {"crop_border": 0, "input_order": "HWC", "test_y_channel": False}
    # RGB -> BGR, the order basicsr's Y conversion expects
    return sr[:, :, ::-1], hr[:, :, ::-1], {"crop_border": scale, "input_order": "HWC", "test_y_channel": True}


def score_psnr(sr: np.ndarray, hr: np.ndarray, protocol: str = "competition", scale: int = 4) -> float:
    """The PSNR of ``score_pair`` alone (no SSIM: a 2048^2 SSIM costs a second per image)."""
    from pipeline.core.compat import calculate_psnr

    a, b, kw = _basicsr_args(sr, hr, protocol, scale)
    return float(calculate_psnr(a, b, **kw))


def score_pair(sr: np.ndarray, hr: np.ndarray, protocol: str = "competition", scale: int = 4) -> dict[str, float]:
    """PSNR, SSIM and NRMSE of one (H,W,3) uint8 RGB prediction against its ground truth."""
    from pipeline.core.compat import calculate_ssim

    psnr = score_psnr(sr, hr, protocol, scale)
    a, b, kw = _basicsr_args(sr, hr, protocol, scale)
    ssim = float(calculate_ssim(a, b, **kw))
    nrmse = 0.0 if math.isinf(psnr) else 10 ** (-psnr / 20)  # = sqrt(MSE) / 255 on the scored pixels
    return {"psnr": psnr, "ssim": ssim, "nrmse": nrmse}


def summary_line(table: pd.DataFrame) -> str:
    """``PSNR <mean> SSIM <mean>`` over ``table``'s rows: the last line of evaluate and mri-evaluate."""
    return f"PSNR {table['psnr'].mean():.4f} SSIM {table['ssim'].mean():.4f}"


BOOTSTRAP_SAMPLES = 2000  # resamples of a paired bootstrap: the 2.5% / 97.5% percentiles move by ~0.1 SE


def paired_gain(a: ArrayLike, b: ArrayLike, n: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``a - b`` over images and its paired bootstrap 95% interval.

    ``a`` and ``b`` are per-image scores (PSNR) of two methods on the same images, in the same order.
    Images are resampled with replacement (the same draw for both methods, so what the images have
    in common cancels) and the interval is the 2.5 / 97.5 percentiles of the resampled mean gains.
    One image gives a zero-width interval; an infinite score (a prediction identical to its ground
    truth) makes the gain undefined: all three are NaN.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_gain needs two equal-length, non-empty 1-D score lists (got {a.shape}, {b.shape})")
    diff = a - b
    if not np.isfinite(diff).all():
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**22 // diff.size)  # resamples per draw: at most ~4M indices in memory
    means = np.concatenate([
        diff[rng.integers(0, diff.size, (min(chunk, n - start), diff.size))].mean(axis=1)  # (k,N) -> (k,)
        for start in range(0, n, chunk)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def gain_text(gain: tuple[float, float, float], images: int = 0) -> str:
    """``+0.1234 dB (95% CI +0.0800 .. +0.1600)``: one way to print a paired gain everywhere. ``images``: how
    many the gain is over, when known: one image has no spread to resample, so it gets no interval."""
    mean, lo, hi = gain
    if math.isnan(mean):
        return "undefined (an infinite PSNR: a prediction identical to its ground truth)"
    if images == 1:
        return f"{mean:+.4f} dB (one image gives no interval: it cannot tell a gain from chance; score several)"
    return f"{mean:+.4f} dB (95% CI {lo:+.4f} .. {hi:+.4f})"
