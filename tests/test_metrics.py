"""One PSNR: the train stage's torch contest_psnr equals evaluate's basicsr PSNR (competition protocol)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.core.metrics import contest_psnr, score_pair


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
