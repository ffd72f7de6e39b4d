"""Volume / slice networks, their table, and the N-d losses (pipeline.mri.archs, .models, pipeline.training.losses)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.core.errors import UserError
from pipeline.mri.models import VOLUME_MODELS, build_volume_model, register, volume_model_kwargs
from pipeline.training.losses import gradient_penalty, total_variation


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _input(name: str, batch: int = 2) -> torch.Tensor:
    spec = VOLUME_MODELS[name]
    size = 16 if spec.role == "critic" else 8  # a critic halves the size per stage
    return torch.rand((batch, 1) + (size,) * spec.dims, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(VOLUME_MODELS))
def test_every_registered_model_runs_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    spec = VOLUME_MODELS[name]
    model = build_volume_model(name)
    x = _input(name)
    out = model(x)
    if spec.role == "critic":
        assert out.shape == (2, 1)
    else:  # the output grid is scale x the input grid per axis
        assert out.shape == (2, 1) + tuple(n * s for n, s in zip(x.shape[2:], spec.scale))
    out.square().mean().backward()
    trained = model.g_hr if spec.role == "cycle" else model  # forward runs the HR generator only
    grads = [p.grad for p in trained.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_mdcsrn_has_the_papers_size_and_is_residual() -> None:
    assert 0.38e6 < _params(build_volume_model("mdcsrn")) < 0.42e6  # b4u4, k=16: ~0.4M in the paper
    model = build_volume_model("mdcsrn-tiny").eval()
    nn.init.zeros_(model.reconstruct.weight)
    nn.init.zeros_(model.reconstruct.bias)
    x = torch.rand(1, 1, 6, 7, 8)
    assert torch.equal(model(x), x)  # same grid, identity plus a learned residual


def test_mdcsrn_receptive_radius_is_exact() -> None:
    """What the N-d tiler's margin must cover for tiled == whole-volume inference."""
    torch.manual_seed(0)
    model = build_volume_model("mdcsrn-tiny").eval()
    r = model.receptive_radius
    n = 2 * r + 5
    x = torch.rand(1, 1, n, n, n)
    y = x.clone()
    c = n // 2
    y[0, 0, c, c, c] += 1.0
    with torch.no_grad():
        changed = (model(y) - model(x)).abs()[0, 0, :, c, c] > 0
    assert changed[c - r] and changed[c + r]
    assert not changed[: c - r].any() and not changed[c + r + 1:].any()


def test_critic_scores_each_sample_on_its_own() -> None:
    """No batch norm in the WGAN-GP critic: a sample's score ignores the rest of the batch."""
    critic = build_volume_model("critic3d-tiny").train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in build_volume_model("critic3d").modules())
    x = torch.rand(2, 1, 12, 12, 12)
    y = x.clone()
    y[1] = torch.rand(1, 12, 12, 12)
    assert torch.allclose(critic(x)[0], critic(y)[0])
    assert critic(torch.rand(1, 1, 20, 24, 16)).shape == (1, 1)  # any patch size


def test_srrescycgan_maps_both_ways_and_splits_its_parameters() -> None:
    model = build_volume_model("srrescycgan-tiny")
    lr = torch.rand(2, 1, 10, 12)
    sr = model(lr)  # (B,1,h,w) -> (B,1,4h,4w)
    assert sr.shape == (2, 1, 40, 48)
    assert model.g_lr(sr).shape == lr.shape
    assert model.d_hr(sr).shape == model.d_lr(lr).shape == (2, 1)
    gen, disc = model.generators(), model.discriminators()
    assert {id(p) for p in gen}.isdisjoint(id(p) for p in disc)
    assert len(gen) + len(disc) == len(list(model.parameters()))


def test_the_table_refuses_duplicates_unknown_names_and_arguments() -> None:
    with pytest.raises(KeyError, match="already registered"):
        register("mdcsrn", nn.Identity, "generator", 3, (1, 1, 1), "again")
    with pytest.raises(UserError, match="unknown volume model 'rrdb'"):
        build_volume_model("rrdb")
    with pytest.raises(UserError, match="no argument"):
        build_volume_model("mdcsrn-tiny", depth=3)
    assert volume_model_kwargs("mdcsrn-tiny", growth=8)["growth"] == 8
    assert _params(build_volume_model("mdcsrn-tiny", growth=8)) > _params(build_volume_model("mdcsrn-tiny"))


class _Linear(nn.Module):
    """critic(x) = <w, x> per sample: its gradient is w everywhere, so the penalty is (||w|| - 1)^2."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("shape", [(1, 4, 5, 6), (2, 3, 4, 5), (1, 7)])  # 3-D, 2-D and 1-D samples
def test_gradient_penalty_matches_a_hand_computation(shape: tuple[int, ...]) -> None:
    critic = _Linear(shape)
    real, fake = torch.rand((3,) + shape), torch.rand((3,) + shape)
    penalty = gradient_penalty(critic, real, fake)
    norm = critic.w.detach().norm()
    assert penalty.item() == pytest.approx(((norm - 1) ** 2).item(), rel=1e-5)
    penalty.backward()  # differentiable in the critic's weights: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    assert torch.allclose(critic.w.grad, 2 * (norm - 1) * critic.w.detach() / norm, rtol=1e-4, atol=1e-6)


def test_gradient_penalty_is_per_sample() -> None:
    """A critic with gradient norm 1 for sample 0 and 3 for sample 1: the mean of (0, 4) = 2."""
    def critic(x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1)[:, :1] * torch.tensor([[1.0], [3.0]]))

    real, fake = torch.rand(2, 1, 3, 3, 3), torch.rand(2, 1, 3, 3, 3)
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(2.0)


def test_total_variation_by_hand() -> None:
    x = torch.arange(4.0).view(1, 1, 1, 1, 4).expand(2, 1, 3, 2, 4)  # ramp of step 1 along the last axis
    assert total_variation(x).item() == pytest.approx(1.0)
    y = torch.zeros(1, 1, 2, 2)
    y[0, 0, 0, 0] = 1.0
    # vertical diffs: |0-1| and 0 -> mean 0.5; horizontal: same -> 0.5
    assert total_variation(y).item() == pytest.approx(1.0)


def test_help_lists_the_table() -> None:
    """The mri stages' ``--help`` lists models from a name tuple that needs no torch: the table's names, in order."""
    from pipeline.mri.names import VOLUME_MODEL_NAMES

    assert VOLUME_MODEL_NAMES == tuple(VOLUME_MODELS)
