"""Losses against hand-computed values: gradient penalty, adversarial formulas, TV, the VGG feature loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from pipeline.core.config import load_config
from pipeline.core.errors import UserError
from pipeline.models.perceptual import IMAGENET_MEAN, IMAGENET_STD, load_vgg_features, vgg19_layer_names
from pipeline.training.losses import (
    build_generator_loss,
    contest_loss,
    discriminator_loss,
    discriminator_terms,
    generator_adversarial,
    gradient_penalty,
    total_variation,
)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _bce(logits: list[float], target: int) -> float:
    """Mean binary cross-entropy of sigmoid(logit) against 0/1, written out: -log s(x) = softplus(-x)."""
    return sum(_softplus(-x) if target else _softplus(x) for x in logits) / len(logits)


REAL = [2.0, -1.0, 0.5, 3.0]
FAKE = [-0.5, 1.5, 0.0, -2.0]


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def test_adversarial_losses_equal_their_formulas() -> None:
    real, fake = torch.tensor(REAL, dtype=torch.float64), torch.tensor(FAKE, dtype=torch.float64)
    r_rel = [x - _mean(FAKE) for x in REAL]  # C(hr) - mean C(sr)
    f_rel = [x - _mean(REAL) for x in FAKE]  # C(sr) - mean C(hr)
    expected = {
        "vanilla": ((_bce(REAL, 1), _bce(FAKE, 0)), _bce(FAKE, 1)),
        "relativistic": ((_bce(r_rel, 1), _bce(f_rel, 0)), _bce(r_rel, 0) + _bce(f_rel, 1)),
        "wgan-gp": ((-_mean(REAL), _mean(FAKE)), -_mean(FAKE)),
    }
    for kind, ((d_real, d_fake), g) in expected.items():
        got_real, got_fake = discriminator_terms(kind, real, fake)
        assert got_real.item() == pytest.approx(d_real, rel=1e-12), kind
        assert got_fake.item() == pytest.approx(d_fake, rel=1e-12), kind
        assert generator_adversarial(kind, fake, real).item() == pytest.approx(g, rel=1e-12), kind
    # per-pixel logit maps (U-Net) are averaged the same way
    maps = fake.view(1, 1, 2, 2)
    assert generator_adversarial("vanilla", maps).item() == pytest.approx(_bce(FAKE, 1), rel=1e-12)
    with pytest.raises(ValueError, match="real_logits"):
        generator_adversarial("relativistic", fake)


def _linear_critic(weight: torch.Tensor, bias: float = 0.3) -> nn.Module:
    critic = nn.Sequential(nn.Flatten(), nn.Linear(weight.numel(), 1)).double()
    with torch.no_grad():
        critic[1].weight.copy_(weight.view(1, -1))
        critic[1].bias.fill_(bias)
    return critic


def test_gradient_penalty_of_a_linear_critic_is_closed_form() -> None:
    """C(x) = w.x + b has gradient w everywhere: GP = (||w|| - 1)^2, and dGP/dw = 2(||w|| - 1) w / ||w||."""
    torch.manual_seed(0)
    w = torch.rand(3 * 4 * 4, dtype=torch.float64)
    critic = _linear_critic(w)
    real, fake = torch.rand(5, 3, 4, 4, dtype=torch.float64), torch.rand(5, 3, 4, 4, dtype=torch.float64)
    norm = w.norm().item()
    gp = gradient_penalty(critic, real, fake)
    assert gp.item() == pytest.approx((norm - 1) ** 2, rel=1e-12)
    gp.backward()  # the penalty trains the critic: its graph was kept
    torch.testing.assert_close(critic[1].weight.grad.view(-1), 2 * (norm - 1) * w / norm)


def test_gradient_penalty_of_a_map_critic_uses_the_per_sample_mean() -> None:
    """A 1x1 conv critic scores a sample by the mean of its HxW map: gradient w/(HW) per pixel, norm ||w||/sqrt(HW)."""
    conv = nn.Conv2d(3, 1, 1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, -4.0, 12.0], dtype=torch.float64).view(1, 3, 1, 1))  # ||w|| = 13
    real, fake = torch.rand(2, 3, 4, 4, dtype=torch.float64), torch.rand(2, 3, 4, 4, dtype=torch.float64)
    assert gradient_penalty(conv, real, fake).item() == pytest.approx((13 / 4 - 1) ** 2, rel=1e-12)


class _Quadratic(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x.pow(2).flatten(1).sum(1, keepdim=True)  # gradient = x itself


def test_gradient_penalty_interpolates_real_and_fake_per_sample() -> None:
    real = torch.tensor([[1.0, 2.0], [0.0, 0.5]], dtype=torch.float64).view(2, 2, 1, 1)
    fake = torch.tensor([[3.0, 0.0], [4.0, 0.5]], dtype=torch.float64).view(2, 2, 1, 1)
    eps = torch.tensor([0.25, 0.5], dtype=torch.float64).view(2, 1, 1, 1)
    # x_hat = eps*real + (1-eps)*fake: [2.5, 0.5] (norm sqrt(6.5)) and [2.0, 0.5] (norm sqrt(4.25))
    expected = ((math.sqrt(6.5) - 1) ** 2 + (math.sqrt(4.25) - 1) ** 2) / 2
    assert gradient_penalty(_Quadratic(), real, fake, eps).item() == pytest.approx(expected, rel=1e-12)


def test_wgan_gp_critic_loss_and_detached_generator() -> None:
    torch.manual_seed(1)
    w = torch.rand(3 * 2 * 2, dtype=torch.float64)
    critic = _linear_critic(w, bias=0.0)
    hr = torch.rand(4, 3, 2, 2, dtype=torch.float64)
    gen_param = torch.ones((), dtype=torch.float64, requires_grad=True)
    sr = torch.rand(4, 3, 2, 2, dtype=torch.float64) * gen_param
    losses = discriminator_loss("wgan-gp", critic, hr, sr, gp_weight=10.0)
    c_real, c_fake = (hr.flatten(1) @ w).mean().item(), (sr.detach().flatten(1) @ w).mean().item()
    gp = (w.norm().item() - 1) ** 2
    assert losses["loss/d_real"].item() == pytest.approx(-c_real, rel=1e-12)
    assert losses["loss/d_fake"].item() == pytest.approx(c_fake, rel=1e-12)
    assert losses["loss/d_gp"].item() == pytest.approx(gp, rel=1e-12)
    assert losses["loss/d_total"].item() == pytest.approx(c_fake - c_real + 10 * gp, rel=1e-12)
    losses["loss/d_total"].backward()
    assert gen_param.grad is None and critic[1].weight.grad is not None  # only the critic learns here
    vanilla = discriminator_loss("vanilla", critic, hr, sr)
    assert set(vanilla) == set(losses) and vanilla["loss/d_gp"].item() == 0.0


def test_total_variation_of_known_images() -> None:
    ramp = torch.linspace(0, 1, 5).view(1, 1, 1, 5).expand(2, 3, 4, 5)  # horizontal steps of 1/4, none vertical
    assert total_variation(ramp).item() == pytest.approx(0.25)
    checker = (torch.arange(6).view(6, 1) + torch.arange(6).view(1, 6)) % 2  # every neighbour differs by 1
    assert total_variation(checker.float().view(1, 1, 6, 6)).item() == pytest.approx(2.0)
    assert total_variation(torch.full((1, 3, 5, 5), 0.7)).item() == 0.0


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A random-initialised torchvision VGG19 saved as torchvision saves the real one (the whole state dict)."""
    torch.manual_seed(0)
    net = torchvision.models.vgg19(weights=None).eval()
    path = tmp_path_factory.mktemp("vgg") / "vgg19-random.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_layer_names_map_to_torchvision_indices(vgg_file: tuple[Path, nn.Module]) -> None:
    names = vgg19_layer_names()
    assert (names.index("conv2_2"), names.index("conv5_4"), names.index("relu5_4")) == (7, 34, 35)
    vgg = vgg_file[1].features
    assert len(names) == len(vgg)
    assert all(n.startswith("conv") == isinstance(m, nn.Conv2d) for n, m in zip(names, vgg))


def test_vgg_features_load_from_file_at_named_layers(vgg_file: tuple[Path, nn.Module]) -> None:
    path, net = vgg_file
    feats = load_vgg_features(path, ("conv2_2", "conv5_4"))
    assert not any(p.requires_grad for p in feats.parameters())
    x = torch.rand(2, 3, 32, 32)
    out = feats(x)
    assert out["conv2_2"].shape == (2, 128, 16, 16) and out["conv5_4"].shape == (2, 512, 2, 2)
    normalised = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(out["conv5_4"], net.features[:35](normalised))  # index 34: before its ReLU
        torch.testing.assert_close(out["conv2_2"], net.features[:8](normalised))
    assert (out["conv2_2"] < 0).any()  # a conv output before the activation, not a ReLU's


def test_generator_loss_with_perceptual_tv_and_adversarial(vgg_file: tuple[Path, nn.Module]) -> None:
    path, _net = vgg_file
    cfg = load_config(None, ["loss.perceptual=0.5", f"loss.vgg_weights={path}", "loss.tv=0.1",
                             "gan.discriminator=unet-sn-nano", "gan.loss=vanilla", "gan.weight=0.01"])
    criterion = build_generator_loss(cfg)
    torch.manual_seed(0)
    sr = torch.rand(2, 3, 32, 32, requires_grad=True)
    hr = torch.rand(2, 3, 32, 32)
    fake = torch.randn(2, 1)
    losses = criterion(sr, hr, fake_logits=fake)
    assert list(losses) == ["loss/total", "loss/l1", "loss/mse", "loss/perceptual", "loss/tv", "loss/adversarial"]
    feats = criterion.vgg
    expected_perceptual = (feats(sr)["conv5_4"] - feats(hr)["conv5_4"]).abs().mean()
    torch.testing.assert_close(losses["loss/perceptual"], expected_perceptual)
    total = (2 * losses["loss/l1"] + losses["loss/mse"] + 0.5 * losses["loss/perceptual"] + 0.1 * losses["loss/tv"]
             + 0.01 * losses["loss/adversarial"])
    torch.testing.assert_close(losses["loss/total"], total)
    losses["loss/total"].backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fake_logits"):
        criterion(sr, hr)


def test_default_generator_loss_is_the_contest_loss() -> None:
    torch.manual_seed(0)
    sr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    ours = build_generator_loss(load_config(None, []))(sr, hr)
    theirs = contest_loss(sr, hr, 2.0, 1.0)
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("overrides,message", [
    (["loss.perceptual=0.1"], "the perceptual loss .* needs loss.vgg_weights: put torchvision's ImageNet weights "
                              "vgg19-dcbb9e9d.pth in models/ and set loss.vgg_weights=models/vgg19-dcbb9e9d.pth"),
    (["loss.perceptual=0.1", "loss.vgg_weights=nowhere/vgg.pth"], "loss.vgg_weights=nowhere/vgg.pth: file not found"),
    (["loss.perceptual=0.1", "loss.perceptual_layers=[conv6_1]"], "unknown VGG19 layer"),
])
def test_perceptual_setting_problems_are_one_line_errors(overrides: list[str], message: str,
                                                         vgg_file: tuple[Path, nn.Module]) -> None:
    if any("layers" in o for o in overrides):
        overrides = [*overrides, f"loss.vgg_weights={vgg_file[0]}"]
    with pytest.raises(UserError, match=message) as info:
        build_generator_loss(load_config(None, overrides))
    assert "\n" not in str(info.value)


def test_wrong_weights_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "alexnet.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11), "features.0.bias": torch.zeros(64)}, path)
    with pytest.raises(UserError, match="alexnet.pth: not torchvision's VGG19 weights"):
        load_vgg_features(path, ("conv1_1",))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="junk.pth: cannot load checkpoint .not a PyTorch weights file"):
        load_vgg_features(tmp_path / "junk.pth", ("conv1_1",))
    # no perceptual weight: no file needed, nothing loaded
    assert build_generator_loss(load_config(None, ["loss.tv=1"])).vgg is None
