"""LR degradations and volume metrics (pipeline.mri.degrade, pipeline.mri.metrics)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import ndimage

from pipeline.core.config import load_config
from pipeline.core.errors import UserError
from pipeline.mri.bundled import bundled_scan
from pipeline.mri.degrade import (
    kspace_mask,
    kspace_truncate,
    make_lr,
    thick_affine,
    thick_slices,
    to_grid,
)
from pipeline.mri.metrics import foreground_mask, nrmse, psnr, score_baselines, score_volume, ssim
from pipeline.mri.volumes import read_volume


def _smooth(shape: tuple[int, int, int], seed: int = 0, sigma: float = 3.0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(shape)
    vol = ndimage.gaussian_filter(noise, sigma, mode="wrap")
    return ((vol - vol.min()) / (vol.max() - vol.min())).astype(np.float32)


@pytest.mark.parametrize("shape,keep", [((12, 10, 9), (0.5, 0.5, 0.5)), ((16, 16, 8), (0.5, 0.25, 1.0))])
def test_kspace_truncation_keeps_low_frequencies_exactly_and_zeroes_the_rest(shape, keep) -> None:
    hr = np.random.default_rng(3).random(shape)
    mask = kspace_mask(shape, keep)
    for axis, (n, k) in enumerate(zip(shape, keep)):  # an odd, centred count per axis, at most keep * n
        kept = mask.any(axis=tuple(a for a in range(3) if a != axis)).sum()
        assert kept == n if k == 1 else (kept % 2 == 1 and kept <= k * n)
    assert 0 < mask.sum() < mask.size
    original = np.fft.fftn(hr)
    image = kspace_truncate(hr, keep, magnitude=False)
    spectrum = np.fft.fftn(image)
    scale = np.abs(original).max()
    assert np.abs(spectrum[mask] - original[mask]).max() <= 1e-12 * scale  # equal to float64 round-off
    assert np.abs(spectrum[~mask]).max() <= 1e-12 * scale
    assert np.abs(image.imag).max() <= 1e-12 * np.abs(image.real).max()  # symmetric box: a real image
    lr = kspace_truncate(hr, keep)
    assert lr.shape == hr.shape and lr.dtype == np.float32
    assert np.allclose(lr, np.abs(image.real), atol=1e-6)  # the magnitude image
    assert not np.allclose(lr, hr, atol=1e-3)


def test_kspace_truncation_keeping_everything_is_the_identity() -> None:
    hr = np.random.default_rng(4).random((6, 7, 8)).astype(np.float32)
    assert np.allclose(kspace_truncate(hr, (1.0, 1.0, 1.0)), hr, atol=1e-6)
    with pytest.raises(UserError, match="kspace_keep"):
        kspace_truncate(hr, (0.5, 0.5))


@pytest.mark.parametrize("factor,axis", [(2, 2), (4, 0), (2, 1)])
def test_thick_slices_of_a_constant_per_group_volume_are_exact(factor: int, axis: int) -> None:
    rng = np.random.default_rng(5)
    groups = rng.random((12 // factor, 5, 6)).astype(np.float32)
    hr = np.moveaxis(np.repeat(groups, factor, axis=0), 0, axis)  # each group of slices identical
    lr = thick_slices(hr, factor, axis)
    assert np.array_equal(lr, np.moveaxis(groups, 0, axis))
    # HR slices that do not fill a last thick slice are cropped.
    extra = np.concatenate([hr, np.take(hr, [0], axis=axis)], axis=axis)
    assert np.array_equal(thick_slices(extra, factor, axis), lr)


def test_thick_affine_centres_each_thick_slice_on_its_hr_slices() -> None:
    affine = np.array([[0.9, 0.1, 0.0, -20.0], [0.0, 1.1, 0.2, 5.0], [0.0, 0.0, 1.5, 30.0], [0, 0, 0, 1.0]])
    lr_affine = thick_affine(affine, 4, axis=2)
    for k in range(3):
        hr_centres = [affine @ np.array([2.0, 3.0, 4 * k + j, 1.0]) for j in range(4)]
        assert np.allclose(lr_affine @ np.array([2.0, 3.0, k, 1.0]), np.mean(hr_centres, axis=0))


def test_linear_interpolation_of_thick_slices_recovers_a_ramp() -> None:
    """Grid alignment: thick slice k sits at the centre of its HR slices, not on slice k*factor."""
    hr = np.broadcast_to(np.arange(16, dtype=np.float32), (3, 4, 16)).copy()
    back = to_grid(thick_slices(hr, 4, axis=2), hr.shape, order=1)
    assert np.allclose(back[..., 2:-2], hr[..., 2:-2], atol=1e-5)  # edges replicate the last thick slice


def test_make_lr_follows_the_degradation_setting() -> None:
    hr = _smooth((8, 8, 16))
    assert make_lr(hr).shape == hr.shape  # the default: k-space, same grid
    cfg = load_config(overrides=["mri.degradation=thick", "mri.thick_factor=2", "mri.thick_axis=1"])
    assert make_lr(hr, cfg.mri).shape == (8, 4, 16)
    with pytest.raises(UserError, match="mri.degradation"):
        make_lr(hr, dataclasses.replace(cfg.mri, degradation="blur"))


def test_identical_volumes_score_perfectly() -> None:
    hr = _smooth((12, 12, 12))
    scores = score_volume(hr, hr, foreground_mask(hr))
    assert scores == {"psnr": math.inf, "ssim": 1.0, "nrmse": 0.0}


def _head() -> np.ndarray:
    """A bright textured ball with a dark core in an empty field of view."""
    z, y, x = np.mgrid[:24, :24, :24] - 11.5
    r = np.sqrt(x**2 + y**2 + z**2)
    return np.where(r < 9, 0.6 + 0.3 * _smooth((24, 24, 24), 1), 0.0) * np.where(r < 3, 0.1, 1.0)


def test_mask_covers_the_anatomy_and_excludes_background() -> None:
    hr = _head()
    mask = foreground_mask(hr, dilate=2)
    assert mask[12, 12, 12]  # the dark core is a hole, filled
    assert not mask[0, 0, 0] and not mask[12, 12, 0]
    assert mask[12, 12, 1 + 12 - 11]  # one voxel outside the ball (r = 10): the dilation
    sr = hr.copy()
    sr[~mask] += 0.5  # errors only in the background
    assert psnr(sr, hr, mask) == math.inf and nrmse(sr, hr, mask) == 0.0
    assert psnr(sr, hr) < 20 and nrmse(sr, hr) > 0  # unmasked, they count


def test_ssim_window_spans_the_third_axis() -> None:
    hr = _smooth((16, 16, 24))
    sr = hr.copy()
    sr[:, :, 8] += 0.2  # one slice changed
    near = np.zeros(hr.shape, bool)
    near[:, :, 10] = True  # two slices away: inside the Gaussian window (radius 5)
    far = np.zeros(hr.shape, bool)
    far[:, :, 16] = True  # eight slices away: outside it
    assert ssim(sr, hr, near) < 0.99
    assert ssim(sr, hr, far) == pytest.approx(1.0, abs=1e-12)
    # Volumes thinner than the 11-voxel window are scored too.
    thin = _smooth((16, 16, 6))
    assert ssim(thin, thin) == pytest.approx(1.0)


def test_baselines_beat_nearest_on_a_smooth_volume() -> None:
    hr = _smooth((16, 16, 32), seed=2, sigma=4.0)
    lr = thick_slices(hr, 4, axis=2)
    scores = score_baselines(lr, hr, names=("nearest", "trilinear", "tricubic"))
    for name in ("trilinear", "tricubic"):
        assert scores[name]["psnr"] > scores["nearest"]["psnr"] + 1
        assert scores[name]["ssim"] > scores["nearest"]["ssim"]
        assert scores[name]["nrmse"] < scores["nearest"]["nrmse"]


def test_bundled_scan_degrades_and_scores() -> None:
    hr = read_volume(bundled_scan("dipy", "data/files/aniso_vox.nii.gz")).data
    mask = foreground_mask(hr)
    assert 0.05 < mask.mean() < 0.95 and not mask[0, 0, 0]
    lr = kspace_truncate(hr, (0.5, 0.5, 1.0))
    scores = score_baselines(lr, hr, mask)
    assert 15 < scores["trilinear"]["psnr"] < 60 and 0 < scores["trilinear"]["ssim"] < 1


def test_metrics_refuse_mismatched_volumes() -> None:
    with pytest.raises(UserError, match="one shape"):
        psnr(np.zeros((4, 4, 4)), np.ones((4, 4, 5)))
    with pytest.raises(UserError, match="constant"):
        foreground_mask(np.ones((4, 4, 4)))
