"""Scores of a volume against its HR: PSNR, 3-D SSIM and NRMSE inside a foreground mask, and baselines.

Rules (docs/volumes.md):
- Foreground mask: voxels of HR above its Otsu threshold, holes filled (ventricles and dark
  tissue inside the head count), dilated by ``dilate`` voxels (6-connected steps) so the edge of
  the anatomy, where blur shows most, is scored. Empty air around the head is left out: it
  would add easy, near-perfect voxels and inflate every score.
- ``data_range`` = max - min of the whole HR volume (independent of how volumes are normalised).
- PSNR = 10 log10(data_range^2 / MSE over the mask); identical volumes give inf.
- SSIM: scikit-image's ``structural_similarity`` on the 3-D arrays (``channel_axis=None``): the
  Gaussian window (sigma 1.5, Wang et al.'s settings, population covariance) runs along all
  three axes; its per-voxel map is averaged over the mask.
- NRMSE = ||sr - hr|| / ||hr|| over the mask (scikit-image's default, the normalisation MRI SR
  papers such as mDCSRN report). Note: the 2-D ``evaluate`` stage divides by the 8-bit range.
- Baselines: the LR brought to the HR grid by trilinear / tricubic spline interpolation
  (``degrade.to_grid``, order 1 / 3; nearest for reference), scored by the same function.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.metrics import normalized_root_mse, structural_similarity

from pipeline.core.config import MriConfig
from pipeline.core.errors import UserError
from pipeline.mri.degrade import INTERPOLATIONS, to_grid
from pipeline.mri.names import BASELINES

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11  # 2 * int(3.5 * 1.5 + 0.5) + 1: the extent of scikit-image's Gaussian (truncate 3.5)
_MRI = MriConfig()  # the defaults live in the config schema, one place


def foreground_mask(hr: np.ndarray, dilate: int = _MRI.mask_dilate) -> np.ndarray:
    """Boolean mask of the anatomy in ``hr``: Otsu threshold, holes filled, dilated ``dilate`` voxels."""
    hr = np.asarray(hr, dtype=np.float64)
    if hr.ndim != 3:
        raise UserError(f"foreground mask: expected a 3-D volume, got shape {hr.shape}")
    if hr.min() == hr.max():
        raise UserError("foreground mask: HR is constant, there is no foreground to score")
    mask = ndimage.binary_fill_holes(hr > threshold_otsu(hr.ravel()))  # 1-D: no guess that a last axis of 3 is RGB
    if dilate > 0:
        mask = ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 1), iterations=dilate)
    return mask


def _pair(sr: np.ndarray, hr: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sr, hr = np.asarray(sr, dtype=np.float64), np.asarray(hr, dtype=np.float64)
    if sr.shape != hr.shape or sr.ndim != 3:
        raise UserError(f"scoring needs two 3-D volumes of one shape, got {sr.shape} and {hr.shape}")
    mask = np.ones(hr.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != hr.shape or not mask.any():
        raise UserError(f"mask of shape {mask.shape} with {int(mask.sum())} voxels does not fit HR {hr.shape}")
    return sr, hr, mask


def data_range_of(hr: np.ndarray) -> float:
    """max - min of HR: the peak of PSNR and the dynamic range of SSIM."""
    value = float(np.max(hr) - np.min(hr))
    if value <= 0:
        raise UserError("HR is constant: PSNR and SSIM need a data range > 0")
    return value


def psnr(sr: np.ndarray, hr: np.ndarray, mask: np.ndarray | None = None, data_range: float | None = None) -> float:
    """10 log10(range^2 / MSE) over the mask (inf when equal there)."""
    sr, hr, mask = _pair(sr, hr, mask)
    peak = data_range_of(hr) if data_range is None else data_range
    mse = float(np.mean((sr[mask] - hr[mask]) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def ssim(sr: np.ndarray, hr: np.ndarray, mask: np.ndarray | None = None, data_range: float | None = None) -> float:
    """Mean over the mask of the 3-D SSIM map (Gaussian window over all three axes)."""
    sr, hr, mask = _pair(sr, hr, mask)
    peak = data_range_of(hr) if data_range is None else data_range
    # scikit-image only uses win_size for a size check and its border crop (the Gaussian itself
    # follows sigma, reflecting at the edges); a smaller odd win_size admits volumes thinner than
    # 11 slices, and the full map with our own mean replaces the border crop.
    win = min(SSIM_WINDOW, min(hr.shape) - (1 - min(hr.shape) % 2))
    _mean, smap = structural_similarity(hr, sr, data_range=peak, channel_axis=None, gaussian_weights=True,
                                        sigma=SSIM_SIGMA, use_sample_covariance=False, win_size=win, full=True)
    return float(smap[mask].mean())


def nrmse(sr: np.ndarray, hr: np.ndarray, mask: np.ndarray | None = None) -> float:
    """||sr - hr|| / ||hr|| over the mask."""
    sr, hr, mask = _pair(sr, hr, mask)
    return float(normalized_root_mse(hr[mask], sr[mask], normalization="euclidean"))


def score_volume(sr: np.ndarray, hr: np.ndarray, mask: np.ndarray | None = None,
                 data_range: float | None = None) -> dict[str, float]:
    """psnr, ssim, nrmse of ``sr`` against ``hr`` over ``mask`` (whole volume when None)."""
    return {"psnr": psnr(sr, hr, mask, data_range), "ssim": ssim(sr, hr, mask, data_range),
            "nrmse": nrmse(sr, hr, mask)}


def score_baselines(lr: np.ndarray, hr: np.ndarray, mask: np.ndarray | None = None,
                    data_range: float | None = None,
                    names: tuple[str, ...] = ("trilinear", "tricubic")) -> dict[str, dict[str, float]]:
    """{baseline: scores} of ``lr`` interpolated to ``hr``'s grid (an identity for same-grid LR)."""
    return {name: score_volume(to_grid(lr, hr.shape, INTERPOLATIONS[BASELINES[name]]), hr, mask, data_range)
            for name in names}
