"""Tiling: the reference grid, tiled == whole image, weights never zero, out-of-memory handling (a real
CUDA one where a GPU is present), the tile batch rule, the padded fixed batch, the cached merge weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.inference.memory import CPU_PIXELS, CUDA_MEMORY_CAP, CUDA_PIXELS, TileMemoryError
from pipeline.inference.tiling import (
    HANN_FLOOR,
    TileError,
    auto_batch,
    batch_bound,
    merge_plan,
    run_tiles,
    tile_forward,
    tile_grid,
    window_1d,
)

GIB = 2**30


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


def test_batch_rule_bounds_pixels_per_forward() -> None:
    # The H100's best eager point: 4 tiles x 8 ways x 128^2 = 524k LR pixels per forward.
    assert CUDA_PIXELS == 4 * 8 * 128 * 128
    assert batch_bound(49, 8, (128, 128), CUDA_PIXELS) == 4
    assert batch_bound(49, 1, (128, 128), CUDA_PIXELS) == 32  # no ensemble: 8x the tiles
    assert batch_bound(3, 8, (32, 32), CUDA_PIXELS) == 3  # never more than the image's tiles
    assert batch_bound(49, 8, (512, 512), CUDA_PIXELS) == 1  # never less than one
    assert batch_bound(49, 8, (32, 32), CPU_PIXELS) == 4
    # The memory bound wins when one tile's measured peak x the batch would pass the budget.
    assert batch_bound(49, 8, (128, 128), CUDA_PIXELS, per_tile_bytes=3 * GIB, budget_bytes=8 * GIB) == 2
    assert batch_bound(49, 8, (128, 128), CUDA_PIXELS, per_tile_bytes=9 * GIB, budget_bytes=8 * GIB) == 1


def test_auto_batch_on_cuda_takes_the_smaller_of_pixels_and_probed_memory() -> None:
    """A fake probe stands for the CUDA measurement: (peak bytes of one tile, free bytes)."""
    cuda = torch.device("cuda")
    seen: list[tuple] = []

    def probe_with(per_tile: int, free: int):
        def probe(fn, channels, shape, device):  # noqa: ANN001, ANN202
            seen.append((channels, shape, device))
            return per_tile, free
        return probe

    # RRDB-like: 1.3 GiB per tile on an 80 GB card. The old rule (60% of free) chose 36 tiles here.
    assert auto_batch(lambda x: x, 3, (128, 128), cuda, 49, ways=8, probe=probe_with(int(1.3 * GIB), 80 * GIB)) == 4
    assert seen == [(3, (128, 128), cuda)]
    # 3 GiB per tile: the 8 GiB cap allows 2.
    assert CUDA_MEMORY_CAP == 8 * GIB
    assert auto_batch(lambda x: x, 3, (128, 128), cuda, 49, ways=8, probe=probe_with(3 * GIB, 80 * GIB)) == 2
    # A busy card with 6 GiB free: half of it, 3 GiB, allows 3 tiles of 1 GiB.
    assert auto_batch(lambda x: x, 3, (128, 128), cuda, 49, ways=8, probe=probe_with(GIB, 6 * GIB)) == 3
    # No ensemble, small tiles: the pixel bound allows 128, memory 16, the image has 49.
    assert auto_batch(lambda x: x, 3, (64, 64), cuda, 49, ways=1, probe=probe_with(GIB // 2, 80 * GIB)) == 16


def test_auto_batch_on_the_cpu_does_not_probe() -> None:
    def never(*_args):  # noqa: ANN002, ANN202
        raise AssertionError("the CPU rule must not run a probe")

    assert auto_batch(lambda x: x, 3, (32, 32), torch.device("cpu"), 49, ways=8, probe=never) == 4
    assert auto_batch(lambda x: x, 3, (32, 32), torch.device("cpu"), 49, ways=1, probe=never) == 32


@pytest.mark.parametrize("blend", ["mean", "hann"])
def test_fixed_batch_pads_the_last_batch_and_drops_the_padding(model: nn.Module, blend: str) -> None:
    calls: list[int] = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return model(x)

    lr = torch.rand(3, 40, 40)  # 16 tiles of 16 / stride 8: batches of 5 leave 1 for the last call
    with torch.no_grad():
        padded, report = run_tiles(spy, lr, 16, 8, blend, batch=5, margin=2, fixed_batch=True)
        assert calls == [5, 5, 5, 5] and report.tiles == 16
        calls.clear()
        plain = tile_forward(spy, lr, 16, 8, blend, batch=5, margin=2)
        assert calls == [5, 5, 5, 1]
    torch.testing.assert_close(padded, plain, atol=1e-6, rtol=0)  # convolutions may round per batch size


def test_merge_weights_are_built_once_per_geometry(model: nn.Module) -> None:
    lr = torch.rand(3, 36, 44)
    merge_plan.cache_clear()
    with torch.no_grad():
        first = tile_forward(model, lr, 16, 8, "hann", margin=2)
        second = tile_forward(model, lr.flip(-1), 16, 8, "hann", margin=2)
    info = merge_plan.cache_info()
    assert info.misses == 1 and info.hits == 1
    assert not torch.equal(first, second)  # a cached plan, not a cached result
    plan = merge_plan(36, 44, 16, 8, "hann", 2, 4, torch.device("cpu"))
    assert plan.maps.shape[0] == 9  # corner, edge and interior tiles: 3 x 3 distinct weight maps
    assert plan.index.shape == (len(tile_grid(36, 44, 16, 8)),)


class Wide(nn.Module):
    """Nearest x4 through a 64-fold wider intermediate: ~50 MB of activations per 64x64 tile in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=4, mode="nearest")  # (N,3,h,w) -> (N,3,4h,4w)
        wide = torch.cat([up] * 64, dim=1)  # (N,3,4h,4w) -> (N,192,4h,4w)
        return wide.unflatten(1, (64, 3)).mean(1)  # (N,192,4h,4w) -> (N,64,3,4h,4w) -> (N,3,4h,4w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: it provokes a real CUDA OOM")
def test_real_cuda_out_of_memory_halves_the_batch() -> None:
    device = torch.device("cuda")
    lr = torch.rand(3, 160, 160, device=device)  # 16 tiles of 64 / stride 32
    with torch.no_grad():
        ref = tile_forward(Wide(), lr, 64, 32, "hann", batch=1)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    # Allow ~300 MiB above what is reserved now: 16 or 8 tiles (~800 / ~400 MB) fail, 4 fit.
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(device) + 300 * 2**20) / total, device)
    try:
        with torch.no_grad():
            out, report = run_tiles(Wide(), lr, 64, 32, "hann", batch=16)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    assert report.batch in (2, 4) and report.tiles == 16
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
