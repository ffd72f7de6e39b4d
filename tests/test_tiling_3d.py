"""The tiler on volumes (1,C,D,H,W): tiled == whole volume, per-axis tiles and scales, shrinking, coverage,
batches, out-of-memory halving and the cached weights, as tests/test_tiling.py checks them on images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.inference.memory import TileMemoryError
from pipeline.inference.tiling import merge_plan, run_tiles, tile_corners, tile_forward, tile_geometry
from pipeline.mri.models import build_volume_model

pytestmark = pytest.mark.usefixtures("fast_cpu")  # many small 3-D convolutions of new shapes


@pytest.fixture(scope="module")
def mdcsrn() -> nn.Module:
    torch.manual_seed(0)
    model = build_volume_model("mdcsrn-tiny").eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode is not an identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


class SliceUp(nn.Module):
    """A 3x3x3 convolution then nearest x4 along the last axis only: scale (1,1,4), radius 1."""

    radius = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=(1, 1, 4), mode="nearest")  # (N,1,d,h,w) -> (N,1,d,h,4w)


@pytest.mark.parametrize("blend", ["mean", "hann"])
@pytest.mark.parametrize("pad", [0, 2])
def test_tiled_volume_equals_whole_volume_with_a_margin_of_the_receptive_radius(mdcsrn: nn.Module, blend: str,
                                                                               pad: int) -> None:
    torch.manual_seed(1)
    lr = torch.rand(1, 1, 19, 23, 17)
    r = mdcsrn.receptive_radius
    with torch.no_grad():
        whole = tile_forward(mdcsrn, lr, 0, 0, blend, pad=pad)
        tiled, report = run_tiles(mdcsrn, lr, 14, 14 - 2 * r, blend, batch=3, pad=pad, margin=r)
        direct = mdcsrn(lr)
    assert report.tiles > 8 and report.tile_shape == (14, 14, 14)
    assert tiled.shape == lr.shape
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    if pad == 0:
        torch.testing.assert_close(whole, direct, atol=1e-5, rtol=0)


def test_without_the_margin_tiles_disagree(mdcsrn: nn.Module) -> None:
    lr = torch.rand(1, 1, 19, 23, 17)
    with torch.no_grad():
        whole = tile_forward(mdcsrn, lr, 0, 0)
        plain = tile_forward(mdcsrn, lr, 14, 4, "mean")
    assert (plain - whole).abs().max() > 1e-4


def test_anisotropic_tiles_strides_margins_and_scale() -> None:
    torch.manual_seed(2)
    model = SliceUp().eval()
    lr = torch.rand(1, 1, 13, 21, 18)
    with torch.no_grad():
        whole = model(lr)
        tiled, report = run_tiles(model, lr, (6, 10, 8), (4, 6, 6), "hann", batch=5, margin=(1, 2, 1))
    assert tiled.shape == (1, 1, 13, 21, 72)  # scale (1,1,4) read from the model's output
    assert report.tile_shape == (6, 10, 8)
    assert report.tiles == len(tile_corners((13, 21, 18), (6, 10, 8), (4, 6, 6)))
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_anisotropic_scale_on_images() -> None:
    """The same per-axis scale on 2 spatial axes: x1 rows, x3 columns."""
    conv = nn.Conv2d(2, 2, 3, padding=1)

    def widen(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(conv(x), scale_factor=(1, 3), mode="nearest")  # (N,2,h,w) -> (N,2,h,3w)

    lr = torch.rand(2, 30, 25)
    with torch.no_grad():
        tiled = tile_forward(widen, lr, (12, 10), (8, 6), "hann", margin=(1, 1))
        torch.testing.assert_close(tiled, widen(lr[None])[0], atol=1e-5, rtol=0)
    assert tiled.shape == (2, 30, 75)


def test_a_tile_larger_than_an_axis_shrinks_to_it(mdcsrn: nn.Module) -> None:
    lr = torch.rand(1, 1, 6, 30, 26)  # 6 slices: thinner than the tile
    r = mdcsrn.receptive_radius
    with torch.no_grad():
        whole = mdcsrn(lr)
        per_axis, report = run_tiles(mdcsrn, lr, (16, 16, 16), (6, 6, 6), "hann", margin=r)
        cube, cube_report = run_tiles(mdcsrn, lr, 16, 6, "hann", margin=r)
    assert report.tile_shape == (6, 16, 16)  # a per-axis tile shrinks on the thin axis only
    assert cube_report.tile_shape == (6, 6, 6)  # an int tile stays a cube (like the 2-D square rule)
    assert cube_report.tiles > report.tiles
    torch.testing.assert_close(per_axis, whole, atol=1e-5, rtol=0)
    assert torch.isfinite(cube).all()


def test_zero_on_an_axis_is_the_whole_axis() -> None:
    sides, steps = tile_geometry((9, 40, 33), (0, 16, 16), (0, 8, 8))
    assert sides == (9, 16, 16) and steps == (9, 8, 8)
    corners = tile_corners((9, 40, 33), (0, 16, 16), (0, 8, 8))
    assert {c[0] for c in corners} == {0} and len(corners) == 4 * 4


@pytest.mark.parametrize("blend", ["mean", "hann"])
@pytest.mark.parametrize("tile,stride,margin", [(8, 4, 2), ((8, 12, 6), (6, 8, 4), (1, 2, 1)), (8, 8, 0), (10, 6, 2)])
def test_every_voxel_has_weight(blend: str, tile, stride, margin) -> None:  # noqa: ANN001
    """A constant model must come back constant: a zero-weight voxel would be 0/0 = NaN."""
    def constant(x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, *x.shape[2:]), 0.3)

    out = tile_forward(constant, torch.rand(1, 1, 17, 21, 19), tile, stride, blend, margin=margin)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full_like(out, 0.3))
    plan = merge_plan(21, 19, tile, stride, blend, margin, 1, torch.device("cpu"), depth=17)
    assert float(plan.wsum.min()) > 0


def test_merge_weights_cover_the_27_tile_kinds_and_are_cached() -> None:
    merge_plan.cache_clear()
    lr = torch.rand(1, 1, 20, 20, 20)
    with torch.no_grad():
        first = tile_forward(SliceUp(), lr, 8, 6, "hann", margin=1)
        tile_forward(SliceUp(), lr.flip(-1), 8, 6, "hann", margin=1)
    info = merge_plan.cache_info()
    assert info.misses == 1 and info.hits == 1
    plan = merge_plan(20, 20, 8, 6, "hann", (1, 1, 1), (1, 1, 4), torch.device("cpu"), depth=20)
    assert plan.maps.shape == (27, 1, 8, 8, 32)  # corner, edge, face and interior tiles: 3 x 3 x 3 maps
    assert plan.wsum.shape == (1, 1, 20, 20, 80) == (1, 1, *first.shape[2:])


def test_oom_halves_the_batch_and_fixed_batch_pads(mdcsrn: nn.Module) -> None:
    calls: list[int] = []

    def picky(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return mdcsrn(x)

    lr = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        out, report = run_tiles(picky, lr, 12, 2, "hann", batch=8, margin=5)
        ref = tile_forward(mdcsrn, lr, 12, 2, "hann", batch=1, margin=5)
        calls.clear()
        padded, fixed = run_tiles(picky, lr, 12, 2, "hann", batch=2, margin=5, fixed_batch=True)
    assert report.batch == 2 and report.tiles == 27
    assert calls == [2] * 14 and fixed.tiles == 27  # 27 tiles in 14 calls of 2: the last one padded
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded, ref, atol=1e-6, rtol=0)


def test_volume_errors_name_the_tile_and_the_setting() -> None:
    def hungry(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(TileMemoryError, match=r"8x8x8 LR, first at z=0 y=0 x=0\) of a 12x12x12 volume.*mri_infer.tile"):
        tile_forward(hungry, torch.rand(1, 1, 12, 12, 12), 8, 4, batch=1)
    with pytest.raises(ValueError, match="tile .* 2 value"):
        tile_forward(lambda x: x, torch.rand(1, 1, 12, 12, 12), (8, 8), 4)
    with pytest.raises(ValueError, match="margin 3 leaves .* 12x12x12 padded volume"):
        tile_forward(lambda x: x, torch.rand(1, 1, 12, 12, 12), 8, 4, margin=3)
    with pytest.raises(ValueError, match=r"\(C,H,W\), \(1,C,H,W\) or \(1,C,D,H,W\)"):
        tile_forward(lambda x: x, torch.rand(2, 1, 12, 12, 12), 8, 4)
