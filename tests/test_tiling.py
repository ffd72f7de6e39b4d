"""Tiling: the reference grid, tiled == whole image, weights never zero, out-of-memory handling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.tiling import (
    HANN_FLOOR,
    TileError,
    TileMemoryError,
    run_tiles,
    tile_forward,
    tile_grid,
    window_1d,
)


class TinyFCN(nn.Module):
    """Two 3x3 convolutions then nearest x4: receptive radius 2 LR pixels, fully convolutional."""

    radius = 2

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(torch.relu(self.c1(x)))
        return F.interpolate(y, scale_factor=4, mode="nearest")  # (B,3,h,w) -> (B,3,4h,4w)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return TinyFCN().eval()


def test_reference_grid_is_49_tiles() -> None:
    corners = tile_grid(512, 512, 128, 64)
    assert len(corners) == 49
    assert sorted({y for y, _ in corners}) == [0, 64, 128, 192, 256, 320, 384]
    assert len(tile_grid(128, 128, 32, 16)) == 49  # the demo's scaled-down contest geometry
    assert tile_grid(512, 512, 0, 64) == [(0, 0)]


@pytest.mark.parametrize("size", [(37, 53), (100, 61), (20, 90)])
def test_grid_covers_every_pixel(size: tuple[int, int]) -> None:
    h, w = size
    side = min(32, h, w)
    covered = torch.zeros(h, w, dtype=torch.int32)
    for y, x in tile_grid(h, w, 32, 20):
        assert 0 <= y <= h - side and 0 <= x <= w - side
        covered[y:y + side, x:x + side] += 1
    assert int(covered.min()) >= 1


@pytest.mark.parametrize("blend", ["mean", "hann"])
@pytest.mark.parametrize("size", [(37, 53), (50, 50), (19, 70)])
@pytest.mark.parametrize("pad", [0, 3])
def test_tiled_equals_whole_image(model: nn.Module, blend: str, size: tuple[int, int], pad: int) -> None:
    torch.manual_seed(1)
    lr = torch.rand(3, *size)
    with torch.no_grad():
        whole = tile_forward(model, lr, 0, 0, blend, pad=pad)
        tiled = tile_forward(model, lr, 16, 10, blend, batch=3, pad=pad, margin=TinyFCN.radius)
        direct = model(lr[None])[0]
    assert tiled.shape == (3, size[0] * 4, size[1] * 4)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    if pad == 0:
        torch.testing.assert_close(whole, direct, atol=1e-6, rtol=0)
    else:  # reflection gives the edges different context than the model's zero padding
        assert (whole - direct).abs().max() > 1e-3


def test_margin_is_what_makes_it_exact(model: nn.Module) -> None:
    """Averaging predictions from tile edges (margin 0, the reference) is not the whole-image output."""
    lr = torch.rand(3, 40, 40)
    with torch.no_grad():
        whole = tile_forward(model, lr, 0, 0)
        plain = tile_forward(model, lr, 16, 8, "mean", margin=0)
    assert (plain - whole).abs().max() > 1e-3


def test_blends_differ_where_tiles_disagree(model: nn.Module) -> None:
    lr = torch.rand(3, 40, 40)
    with torch.no_grad():
        mean = tile_forward(model, lr, 16, 8, "mean")
        hann = tile_forward(model, lr, 16, 8, "hann")
    assert (mean - hann).abs().max() > 1e-4


@pytest.mark.parametrize("blend", ["mean", "hann"])
@pytest.mark.parametrize("tile,stride,margin", [(16, 8, 4), (16, 10, 3), (16, 16, 0), (32, 20, 6)])
def test_no_pixel_has_zero_weight(blend: str, tile: int, stride: int, margin: int) -> None:
    """A constant model must come back constant: a zero-weight pixel would be 0/0 = NaN."""
    def constant(x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 3, x.shape[2] * 4, x.shape[3] * 4), 0.7)

    out = tile_forward(constant, torch.rand(3, 45, 71), tile, stride, blend, margin=margin)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full_like(out, 0.7))


def test_hann_window_has_floor() -> None:
    w = window_1d(64, "hann")
    assert float(w.min()) >= HANN_FLOOR * 0.99 and float(w.max()) <= 1.0
    assert float(w[0]) < 0.1 < float(w[32])
    torch.testing.assert_close(w, w.flip(0))


def test_oom_halves_the_batch_and_matches(model: nn.Module) -> None:
    calls: list[int] = []

    def picky(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model(x)

    lr = torch.rand(3, 40, 40)
    with torch.no_grad():
        out, report = run_tiles(picky, lr, 16, 8, "hann", batch=8, margin=2)
        ref = tile_forward(model, lr, 16, 8, "hann", batch=1, margin=2)
    assert report.batch == 2 and report.tiles == 16
    assert calls[:3] == [8, 4, 2] and max(calls[3:]) == 2
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_oom_on_one_tile_stops_with_context() -> None:
    def hungry(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(TileMemoryError, match=r"single tile .*16x16 LR.*40x40 image.*infer.tile"):
        tile_forward(hungry, torch.rand(3, 40, 40), 16, 8, batch=4)


def test_other_errors_name_the_tile() -> None:
    seen = 0

    def flaky(x: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        seen += x.shape[0]
        if seen > 4:
            raise ValueError("bad weights")
        return F.interpolate(x, scale_factor=4)

    with pytest.raises(TileError, match=r"tiles 4\.\.5 of 16 .*ValueError: bad weights"):
        tile_forward(flaky, torch.rand(3, 40, 40), 16, 8, batch=2)


def test_wrong_output_shape_is_an_error() -> None:
    def crop(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=4)[..., :-1]

    with pytest.raises(TileError, match="expected"):
        tile_forward(crop, torch.rand(3, 40, 40), 16, 8)


def test_bad_arguments() -> None:
    lr = torch.rand(3, 40, 40)
    with pytest.raises(ValueError, match="stride"):
        tile_forward(lambda x: x, lr, 16, 20)
    with pytest.raises(ValueError, match="margin"):
        tile_forward(lambda x: x, lr, 16, 8, margin=5)
    with pytest.raises(ValueError, match="blend"):
        tile_forward(lambda x: x, lr, 16, 8, "gauss")


def test_image_smaller_than_tile_and_batched_input(model: nn.Module) -> None:
    lr = torch.rand(1, 3, 12, 30)
    with torch.no_grad():
        out = tile_forward(model, lr, 128, 64, "hann", margin=2)
        torch.testing.assert_close(out, model(lr), atol=1e-5, rtol=0)
