"""The inference core's device path: infer.compile (the auto rule, the fixed tile batch, a real compile
against eager), infer.merge through the settings, and bf16 against fp32 (on the CPU, and on CUDA
where a GPU is present)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import pipeline.inference.predict as predict
from pipeline.core.compat import imresize
from pipeline.core.errors import UserError
from pipeline.inference.predict import COMPILE_MODES, Settings, compile_choice, predict_images
from pipeline.models.table import build_model

CONTEST_PIXELS = 49 * 8 * 128 * 128  # one 512 LR image: 49 tiles of 128^2, 8 ways


def _photo(side: int, seed: int = 0) -> np.ndarray:
    """A smooth random (side,side,3) image in [0,1] (upscaled noise, closer to a photo than white noise)."""
    small = np.random.default_rng(seed).random((side // 4 + 2, side // 4 + 2, 3))
    return imresize(small, 4)[:side, :side].clip(0, 1).astype(np.float32)


def test_compile_auto_rule() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert set(COMPILE_MODES) == {"off", "default", "reduce-overhead", "auto"}
    assert compile_choice("auto", cuda, 18 * CONTEST_PIXELS) == "off"  # a contest test set: 18 images
    assert compile_choice("auto", cuda, 100 * CONTEST_PIXELS) == "off"  # past break-even (~86), not 2x
    assert compile_choice("auto", cuda, 328 * CONTEST_PIXELS) == "default"  # a validation fold of 1640 / 5
    assert compile_choice("auto", cpu, 10**6 * CONTEST_PIXELS) == "off"  # never on the CPU
    assert compile_choice("reduce-overhead", cpu, 1) == "reduce-overhead"  # explicit modes are honoured
    assert compile_choice("off", cuda, 10**6 * CONTEST_PIXELS) == "off"


class ShapeSpy(nn.Module):
    """Stands in for torch.compile's result: records every batch shape the 'compiled' model sees."""

    def __init__(self, model: nn.Module, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.model, self.shapes = model, shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.model(x)


def test_compiled_forward_sees_one_shape_and_is_timed_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, ...]] = []
    modes: list[tuple] = []

    def fake_compile(model: nn.Module, mode: str, dynamic: bool) -> nn.Module:
        modes.append((mode, dynamic))
        return ShapeSpy(model, shapes)

    monkeypatch.setattr(predict.torch, "compile", fake_compile)
    torch.manual_seed(0)
    model = build_model("edsr-nano")
    lrs = [_photo(20, 0), _photo(20, 1)]  # 16 tiles of 8 / stride 4 each; batches of 3 leave 1
    settings = Settings(tta=2, tile=8, stride=4, batch=3, precision="fp32", compile="reduce-overhead")
    out, timing = predict_images([model], lrs, settings, torch.device("cpu"))
    assert modes == [("reduce-overhead", False)]
    assert set(shapes) == {(3 * 2, 3, 8, 8)}  # 3 tiles x 2 ways, the last batch padded
    assert len(shapes) == 3 * 6  # 6 calls per image: the warm-up run of image 0, then images 0 and 1
    assert timing.compile == "reduce-overhead" and math.isfinite(timing.compile_seconds) and timing.images == 2
    eager, eager_timing = predict_images([model], lrs, Settings(**{**settings.__dict__, "compile": "off"}))
    assert eager_timing.compile == "off" and eager_timing.compile_seconds == 0
    for a, b in zip(out, eager):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_torch_compile_matches_eager_on_a_tiny_model() -> None:
    """One real compile (inductor, on the CPU) with a padded last batch: the same output as eager."""
    torch.manual_seed(0)
    model = build_model("edsr-nano")
    lr = _photo(20)
    settings = Settings(tta=2, tile=8, stride=4, batch=3, precision="fp32", compile="default")
    (compiled,), timing = predict_images([model], [lr], settings, torch.device("cpu"))
    (eager,), _ = predict_images([model], [lr], Settings(**{**settings.__dict__, "compile": "off"}))
    assert timing.compile == "default" and timing.compile_seconds > 0
    np.testing.assert_allclose(compiled, eager, atol=1e-5, rtol=0)


def test_defaults_on_the_cpu_do_not_compile() -> None:
    (sr,), timing = predict_images([build_model("edsr-nano")], [_photo(16)], Settings(tta=1, tile=8, stride=4))
    assert timing.compile == "off" and timing.compile_seconds == 0 and sr.shape == (64, 64, 3)
    assert timing.summary()["compile"] == "off" and "compile_seconds" in timing.summary()


def test_merge_setting_reaches_the_ensemble() -> None:
    torch.manual_seed(0)
    model = build_model("edsr-nano")
    lr = _photo(16)
    base = Settings(tta=8, tile=0, precision="fp32")
    (mean,), _ = predict_images([model], [lr], base)
    (med,), _ = predict_images([model], [lr], Settings(**{**base.__dict__, "merge": "median"}))
    (one,), _ = predict_images([model], [lr], Settings(**{**base.__dict__, "tta": 1, "merge": "median"}))
    (one_mean,), _ = predict_images([model], [lr], Settings(**{**base.__dict__, "tta": 1}))
    assert np.abs(mean - med).max() > 1e-5
    np.testing.assert_array_equal(one, one_mean)  # the median of one way is that way
    assert Settings(merge="median").label().startswith("tta8 median ")
    with pytest.raises(UserError, match="infer.merge=max"):
        predict_images([model], [lr], Settings(**{**base.__dict__, "merge": "max"}))


def _bf16_vs_fp32(device: torch.device) -> tuple[float, float]:
    """(max, mean) |bf16 - fp32| of SRCNN's 2-way tiled output on a smooth image (random weights)."""
    torch.manual_seed(0)
    model = build_model("srcnn")
    lr = _photo(24)
    fp32 = Settings(tta=2, tile=12, stride=6, precision="fp32", compile="off")
    (a,), _ = predict_images([model], [lr], fp32, device)
    (b,), timing = predict_images([model], [lr], Settings(**{**fp32.__dict__, "precision": "bf16"}), device)
    assert timing.precision == "bf16" and a.min() < 0.2 and a.max() > 0.8  # an output with a photo's range
    diff = np.abs(a - b)
    return float(diff.max()), float(diff.mean())


# bf16 autocast against fp32: at most one grey level anywhere, 1/10 of a level on average. On the
# CPU (oneDNN, this test's case) it measured max 6.1e-4 and mean 1.1e-4: 1/6 and 1/36 of a level.
BF16_MAX, BF16_MEAN = 1 / 255, 0.1 / 255


def test_bf16_matches_fp32_on_the_cpu() -> None:
    worst, mean = _bf16_vs_fp32(torch.device("cpu"))
    assert worst <= BF16_MAX and mean <= BF16_MEAN


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: bf16 autocast on the GPU")
def test_bf16_matches_fp32_on_cuda() -> None:
    worst, mean = _bf16_vs_fp32(torch.device("cuda"))
    assert worst <= BF16_MAX and mean <= BF16_MEAN


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the probed tile batch")
def test_default_tile_batch_on_cuda_is_bounded_by_pixels() -> None:
    """edsr-tiny takes little memory, so the pixel bound decides: 4 tiles of 128^2 x 8 ways per forward."""
    torch.manual_seed(0)
    (sr,), timing = predict_images([build_model("edsr-tiny")], [_photo(256)], Settings(tile=128, stride=64),
                                   torch.device("cuda"))
    assert timing.batch == 4 and timing.compile == "off" and timing.precision in ("bf16", "fp16")
    assert sr.shape == (1024, 1024, 3) and np.isfinite(sr).all()
