"""Self-ensemble: the dihedral group, equivariant models, hand-computed averages and medians, batching."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.inference.ensemble import average_models, dihedral, dihedral_inverse, median, self_ensemble
from pipeline.inference.tiling import tile_forward


def _symmetrise(weight: torch.Tensor) -> torch.Tensor:
    """Average a (O,I,k,k) kernel over the 8 symmetries of the square: a D4-invariant kernel."""
    rots = [torch.rot90(weight, r, (-2, -1)) for r in range(4)]
    return torch.stack(rots + [r.flip(-1) for r in rots]).mean(0)


class Equivariant(nn.Module):
    """Convolutions with D4-invariant kernels, pointwise ReLU, nearest x4: commutes with flips/transposes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 3, 5, padding=2)
        with torch.no_grad():
            for conv in (self.c1, self.c2):
                conv.weight.copy_(_symmetrise(conv.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.c2(torch.relu(self.c1(x))), scale_factor=4, mode="nearest")


class Skewed(nn.Module):
    """An ordinary random conv net: NOT equivariant, so every way gives a different output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.c2(torch.relu(self.c1(x))), scale_factor=4, mode="nearest")


def _hand_ways(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 ways written independently with rot90, each mapped back."""
    outs = []
    for r in range(4):
        for flip in (False, True):
            z = x.flip(-1) if flip else x
            y = torch.rot90(model(torch.rot90(z, r, (-2, -1))), -r, (-2, -1))
            outs.append(y.flip(-1) if flip else y)
    return outs


def _hand_average(model: nn.Module, x: torch.Tensor, ways: int) -> torch.Tensor:
    """The ensemble written independently with rot90: ways 2 = +hflip, 4 = all flips, 8 = group."""
    if ways == 2:
        return (model(x) + model(x.flip(-1)).flip(-1)) / 2
    if ways == 4:
        outs = [model(x), model(x.flip(-1)).flip(-1), model(x.flip(-2)).flip(-2),
                torch.rot90(model(torch.rot90(x, 2, (-2, -1))), -2, (-2, -1))]
        return sum(outs) / 4
    return sum(_hand_ways(model, x)) / 8


@pytest.fixture
def image() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.rand(2, 3, 12, 17)


@pytest.mark.parametrize("k", range(8))
def test_inverse_undoes_transform(image: torch.Tensor, k: int) -> None:
    assert torch.equal(dihedral_inverse(dihedral(image, k), k), image)


def test_eight_transforms_are_the_dihedral_group() -> None:
    x = torch.rand(1, 1, 5, 5)
    ours = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    rots = [torch.rot90(x, r, (-2, -1)) for r in range(4)]
    group = {tuple(t.flatten().tolist()) for t in rots + [r.flip(-1) for r in rots]}
    assert len(ours) == 8 and ours == group


@pytest.mark.parametrize("ways", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(12, 12), (12, 17)])
def test_equivariant_model_equals_one_forward(ways: int, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = Equivariant().eval()
    x = torch.rand(2, 3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(self_ensemble(model, x, ways), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ways", [2, 4, 8])
@pytest.mark.parametrize("shape", [(12, 12), (12, 17)])
def test_skewed_model_equals_hand_average(ways: int, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = Skewed().eval()
    x = torch.rand(2, 3, *shape)
    with torch.no_grad():
        ours = self_ensemble(model, x, ways)
        torch.testing.assert_close(ours, _hand_average(model, x, ways), atol=1e-6, rtol=0)
        assert (ours - model(x)).abs().max() > 1e-3  # the ways really differ for this model


def test_ways_go_through_the_model_as_one_batch(image: torch.Tensor) -> None:
    calls: list[tuple[int, ...]] = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return F.interpolate(x, scale_factor=4)

    self_ensemble(spy, image[..., :12], 8)  # square tiles: one call of 8 x 2 images
    assert calls == [(16, 3, 12, 12)]
    calls.clear()
    self_ensemble(spy, image, 8)  # non-square: the transposed half has its own shape
    assert calls == [(8, 3, 12, 17), (8, 3, 17, 12)]
    calls.clear()
    self_ensemble(spy, image, 4)  # flips keep the shape
    assert calls == [(8, 3, 12, 17)]


def test_average_is_taken_before_clamping() -> None:
    x = torch.rand(1, 3, 6, 6)

    def overshoot(z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z, scale_factor=4) * 3 - 1  # values in [-1, 2]

    out = self_ensemble(overshoot, x, 8)
    torch.testing.assert_close(out, overshoot(x))
    assert out.max() > 1 and out.min() < 0


def test_multi_model_average(image: torch.Tensor) -> None:
    torch.manual_seed(0)
    a, b = Skewed().eval(), Skewed().eval()
    with torch.no_grad():
        torch.testing.assert_close(average_models([a, b], image), (a(image) + b(image)) / 2)
        expected = (_hand_average(a, image, 8) + _hand_average(b, image, 8)) / 2
        torch.testing.assert_close(average_models([a, b], image, 8), expected, atol=1e-6, rtol=0)


def test_ensemble_of_tiles_equals_ensemble_of_whole_image() -> None:
    """Tiles x ways in one batch: with a margin covering the receptive field, same as whole image."""
    torch.manual_seed(0)
    model = Skewed().eval()
    lr = torch.rand(3, 30, 41)
    with torch.no_grad():
        whole = self_ensemble(model, lr[None], 8)[0]
        tiled = tile_forward(partial(self_ensemble, model, ways=8), lr, 16, 10, "hann", batch=4, margin=2)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_bad_ways(image: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="ways"):
        self_ensemble(lambda x: x, image, 3)


@pytest.mark.parametrize("shape", [(12, 12), (12, 17)])
def test_median_of_eight_ways_equals_numpy_median(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = Skewed().eval()
    x = torch.rand(2, 3, *shape)
    with torch.no_grad():
        ours = self_ensemble(model, x, 8, merge="median")
        ways = np.stack([y.numpy() for y in _hand_ways(model, x)])  # (8,N,C,4h,4w)
        expected = np.median(ways, axis=0)  # even count: mean of the 4th and 5th values
        torch.testing.assert_close(ours, torch.from_numpy(expected), atol=1e-6, rtol=0)
        assert (ours - self_ensemble(model, x, 8)).abs().max() > 1e-4  # not the mean


def test_median_by_hand_and_across_models() -> None:
    a = torch.tensor([[1.0, 5.0], [9.0, -2.0]])
    b = torch.tensor([[3.0, 4.0], [0.0, -1.0]])
    c = torch.tensor([[2.0, 7.0], [1.0, -8.0]])
    assert median([a, b, c]).tolist() == [[2.0, 5.0], [1.0, -2.0]]
    assert median([a, b]).tolist() == [[2.0, 4.5], [4.5, -1.5]]  # even: the middle two averaged
    torch.manual_seed(0)
    models = [Skewed().eval() for _ in range(3)]
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        per_model = [np.median(np.stack([y.numpy() for y in _hand_ways(m, x)]), axis=0) for m in models]
        expected = np.median(np.stack(per_model), axis=0)  # each model's median, then the models' median
        ours = average_models(models, x, 8, merge="median")
    torch.testing.assert_close(ours, torch.from_numpy(expected), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="merge"):
        average_models(models, x, 8, merge="max")


@pytest.mark.parametrize("merge", ["mean", "median"])
@pytest.mark.parametrize("shape", [(1, 3, 6, 6), (3, 3, 5, 7)])  # one square image; three non-square tiles
def test_ways_split_over_calls_merge_to_the_same_output(merge: str, shape: tuple[int, ...]) -> None:
    """per_call caps the images of one call (a whole image's 8 ways as 8 calls): equal calls, one shape each,
    and the merged result of every split is the one-call result (up to the conv's own batch rounding)."""
    torch.manual_seed(0)
    model, x = Skewed().eval(), torch.rand(*shape)
    calls: list[tuple[int, ...]] = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape))
        return model(batch)

    with torch.no_grad():
        one = self_ensemble(fn, x, 8, merge)
        for per_call in (1, 2, 3, 5):
            calls.clear()
            split = self_ensemble(fn, x, 8, merge, per_call=per_call)
            torch.testing.assert_close(split, one, rtol=0, atol=1e-6)
            assert all(c[0] <= per_call for c in calls) and sum(c[0] for c in calls) == 8 * shape[0]
            groups = 1 if shape[-1] == shape[-2] else 2  # a non-square input: kept and transposed shapes
            assert len(set(calls)) == groups  # equal calls within a shape: a compiled model sees one batch size
