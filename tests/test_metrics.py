"""One PSNR: the train stage's torch contest_psnr equals evaluate's basicsr PSNR (competition protocol)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.core.metrics import contest_psnr, gain_text, paired_gain, score_pair


def test_contest_psnr_equals_basicsr_on_random_uint8_images() -> None:
    rng = np.random.default_rng(0)
    for shape in ((16, 16, 3), (37, 23, 3), (64, 48, 3)):
        hr = rng.integers(0, 256, shape, dtype=np.uint8)
        noise = rng.integers(-40, 41, shape)
        sr = np.clip(hr.astype(int) + noise, 0, 255).astype(np.uint8)
        # The prediction as the model gives it: floats in [0,1] that round back to the same uint8.
        sr_float = torch.from_numpy(sr).permute(2, 0, 1).float().div(255)  # (H,W,3) -> (3,H,W)
        ours = contest_psnr(sr_float, torch.from_numpy(hr).permute(2, 0, 1))
        theirs = score_pair(sr, hr, "competition")["psnr"]
        assert ours == pytest.approx(theirs, abs=1e-9)
        assert 10 < ours < 40  # a real, finite comparison


def test_contest_psnr_rounds_once_and_identical_images_are_infinite() -> None:
    hr = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    assert contest_psnr(hr.float() / 255, hr) == math.inf
    # 100.4/255 rounds to 100 (no error); 100.6/255 rounds to 101: an error of 1 everywhere = 48.13 dB.
    assert contest_psnr(torch.full((3, 4, 4), 100.4 / 255), hr) == math.inf
    assert contest_psnr(torch.full((3, 4, 4), 100.6 / 255), hr) == pytest.approx(10 * math.log10(255**2))


def test_paired_gain_covers_a_planted_difference() -> None:
    """Per-image gains = 0.3 dB + noise: the 95% interval covers 0.3 in about 95% of data sets (a
    percentile bootstrap on 40 images runs a little under), and excludes 0 when the gain is clear."""
    rng = np.random.default_rng(1)
    covered, excludes_zero = 0, 0
    trials = 200
    for t in range(trials):
        b = rng.normal(25, 2, 40)  # images differ a lot; pairing removes that
        a = b + 0.3 + rng.normal(0, 0.2, 40)
        mean, lo, hi = paired_gain(a, b, n=1000, seed=t)
        assert lo <= mean <= hi
        covered += lo <= 0.3 <= hi
        excludes_zero += lo > 0
    assert 0.88 <= covered / trials <= 0.99
    assert excludes_zero == trials


def test_paired_gain_includes_zero_for_noise() -> None:
    rng = np.random.default_rng(2)
    trials, includes = 200, 0
    for t in range(trials):
        b = rng.normal(25, 2, 40)
        a = b + rng.normal(0, 0.2, 40)  # no real difference
        _mean, lo, hi = paired_gain(a, b, n=1000, seed=t)
        includes += lo <= 0 <= hi
    assert 0.88 <= includes / trials <= 0.99  # a 95% interval: wrong about 1 time in 20


def test_paired_gain_pairs_the_images() -> None:
    """Image-to-image spread much larger than the gain: unpaired it would hide a real +0.1 dB."""
    b = np.linspace(18, 34, 30)
    a = b + 0.1 + np.tile([0.01, -0.01], 15)
    mean, lo, hi = paired_gain(a, b)
    assert mean == pytest.approx(0.1) and 0.09 < lo < hi < 0.11
    assert paired_gain(a, b) == paired_gain(a, b)  # seeded: the same interval every time
    assert paired_gain([26.0], [25.0]) == (1.0, 1.0, 1.0)  # one image: no spread to resample


def test_paired_gain_edge_cases() -> None:
    assert all(math.isnan(v) for v in paired_gain([math.inf, 30.0], [20.0, 21.0]))
    assert "undefined" in gain_text(paired_gain([math.inf], [20.0]))
    assert gain_text((0.1234, 0.05, 0.2)) == "+0.1234 dB (95% CI +0.0500 .. +0.2000)"
    with pytest.raises(ValueError, match="equal-length"):
        paired_gain([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        paired_gain([], [])
    # many images: resampled in chunks, same answer as the interval's definition
    rng = np.random.default_rng(3)
    d = rng.normal(0.05, 0.1, 5000)
    mean, lo, hi = paired_gain(d, np.zeros_like(d), n=400)
    se = d.std() / math.sqrt(d.size)
    assert mean == pytest.approx(d.mean()) and lo == pytest.approx(mean - 1.96 * se, abs=0.3 * se)
    assert hi == pytest.approx(mean + 1.96 * se, abs=0.3 * se)
