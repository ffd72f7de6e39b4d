"""LR volumes from HR volumes: k-space truncation, thick slices, and interpolation back to the HR grid.

- ``kspace_truncate``: the 3-D FFT of HR, every coefficient outside a central box zeroed, the
  magnitude of the inverse FFT (what a scanner reconstructs from fewer phase encodes), on the
  same voxel grid: mDCSRN's training data. The box keeps frequencies -k..k along an axis (an odd
  count, symmetric about DC, so the truncated spectrum of a real volume stays Hermitian and the
  inverse is real before the magnitude is taken); ``keep`` = 1 keeps an axis whole.
- ``thick_slices``: ``factor`` consecutive slices along ``axis`` averaged into one thick slice
  (partial-volume averaging of a thick acquisition); HR slices that do not fill a last thick
  slice are cropped (``crop_to_multiple``). ``thick_affine`` is the LR grid: voxel size x factor
  along the axis, the origin moved to the centre of the first thick slice.
- ``to_grid``: spline interpolation (scipy.ndimage.zoom, order 0 / 1 / 3) onto another grid with
  voxels treated as cells (``grid_mode``), so thick slice k lands on the centre of HR slices
  k*factor .. k*factor+factor-1, not on slice k*factor. Edges replicate the last voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pipeline.core.config import MriConfig
from pipeline.core.errors import UserError

INTERPOLATIONS = {"nearest": 0, "linear": 1, "cubic": 3}  # name -> spline order of scipy.ndimage
DEGRADATIONS = ("kspace", "thick")
_MRI = MriConfig()  # the defaults live in the config schema, one place


def _check_volume(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 3:
        raise UserError(f"expected a 3-D volume, got shape {x.shape}")
    return x


def kspace_mask(shape: Sequence[int], keep: Sequence[float]) -> np.ndarray:
    """Boolean (X,Y,Z) mask in numpy's FFT layout: True on the central box of ``keep`` per axis."""
    if len(keep) != len(shape) or not all(0 < k <= 1 for k in keep):
        raise UserError(f"mri.kspace_keep={tuple(keep)}: need one fraction in (0, 1] per axis of {tuple(shape)}")
    axes = []
    for n, k in zip(shape, keep):
        freq = np.abs(np.fft.fftfreq(n) * n)  # |integer frequency| of every FFT index
        if k >= 1:
            axes.append(np.ones(n, dtype=bool))
            continue
        half = max(0, (int(round(k * n)) - 1) // 2)  # keep -half..half: 2*half+1 <= k*n coefficients
        axes.append(freq <= half)
    # Outer product of the per-axis masks: (X,) x (Y,) x (Z,) -> (X,Y,Z)
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]


def kspace_truncate(hr: np.ndarray, keep: Sequence[float] = _MRI.kspace_keep, magnitude: bool = True) -> np.ndarray:
    """Zero the spectrum of ``hr`` outside the central box; float32 magnitude (or the complex image)."""
    hr = _check_volume(hr)
    spectrum = np.fft.fftn(hr.astype(np.float64))
    spectrum[~kspace_mask(hr.shape, keep)] = 0
    image = np.fft.ifftn(spectrum)
    return np.abs(image).astype(np.float32) if magnitude else image


def crop_to_multiple(hr: np.ndarray, factor: int, axis: int) -> np.ndarray:
    """``hr`` without the trailing slices along ``axis`` that do not fill a thick slice."""
    hr = _check_volume(hr)
    n = hr.shape[axis] // factor * factor
    if n == 0:
        raise UserError(f"{hr.shape[axis]} slice(s) along axis {axis} cannot make one thick slice of {factor}")
    return np.take(hr, np.arange(n), axis=axis)


def thick_slices(hr: np.ndarray, factor: int, axis: int = 2) -> np.ndarray:
    """Average every ``factor`` consecutive slices along ``axis`` (float32, the LR grid)."""
    if factor < 1 or not 0 <= axis < 3:
        raise UserError(f"thick slices need factor >= 1 and axis in 0..2, got mri.thick_factor={factor}, "
                        f"mri.thick_axis={axis}")
    hr = np.moveaxis(crop_to_multiple(hr, factor, axis), axis, 0).astype(np.float64)
    n, *rest = hr.shape
    # (n,A,B) -> (n/factor, factor, A, B) -> mean over the factor axis -> (n/factor, A, B)
    lr = hr.reshape(n // factor, factor, *rest).mean(axis=1)
    return np.moveaxis(lr, 0, axis).astype(np.float32)


def _coarse_step(factors: Sequence[float]) -> np.ndarray:
    """Coarse voxel index -> fine voxel index when every ``factors[a]`` fine voxels make one coarse voxel."""
    # Coarse index i along an axis is centred on fine index f*i + (f-1)/2 (voxels are cells).
    step = np.eye(4)
    for axis, f in enumerate(factors):
        step[axis, axis] = f
        step[axis, 3] = (f - 1) / 2
    return step


def thick_affine(affine: np.ndarray, factor: int, axis: int = 2) -> np.ndarray:
    """The voxel -> world affine of ``thick_slices(hr, factor, axis)`` given HR's affine."""
    factors = [1, 1, 1]
    factors[axis] = factor
    return np.asarray(affine, dtype=np.float64) @ _coarse_step(factors)


def finer_affine(affine: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """The affine of a grid ``factors[a]`` times finer per axis over the same field of view.

    The inverse of ``thick_affine``: ``finer_affine(thick_affine(A, f, axis), f on axis) == A``.
    """
    return np.asarray(affine, dtype=np.float64) @ np.linalg.inv(_coarse_step(factors))


def to_grid(lr: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Interpolate ``lr`` onto a grid of ``shape`` covering the same field of view (float32)."""
    lr = _check_volume(lr)
    if order not in INTERPOLATIONS.values():
        raise UserError(f"interpolation order {order} is not one of {sorted(INTERPOLATIONS.values())}")
    zoom = [s / n for s, n in zip(shape, lr.shape)]
    # (X,Y,Z) -> shape; grid_mode: voxels are cells, so the fields of view coincide exactly.
    out = ndimage.zoom(lr.astype(np.float64), zoom, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):  # zoom rounds shape * factor; a ratio that rounds wrong is a bug
        raise RuntimeError(f"zoom of {lr.shape} to {tuple(shape)} gave {out.shape}")
    return out.astype(np.float32)


def make_lr(hr: np.ndarray, mri: MriConfig = _MRI) -> np.ndarray:
    """LR of ``hr`` by ``mri.degradation``: same grid for kspace; for thick, the grid of
    ``thick_affine`` (score it against ``crop_to_multiple(hr, mri.thick_factor, mri.thick_axis)``)."""
    if mri.degradation == "kspace":
        return kspace_truncate(hr, mri.kspace_keep)
    if mri.degradation == "thick":
        return thick_slices(hr, mri.thick_factor, mri.thick_axis)
    raise UserError(f"mri.degradation={mri.degradation!r} is not one of {', '.join(DEGRADATIONS)}")
