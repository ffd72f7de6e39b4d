"""Every discriminator of the table runs forward and backward; sizes and critic pairings are checked up front."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.core.errors import UserError
from pipeline.models.discriminators import (
    DISCRIMINATORS,
    build_discriminator,
    check_discriminator,
    discriminator_kwargs,
)

pytestmark = pytest.mark.usefixtures("fast_cpu")  # tests/conftest.py


@pytest.mark.parametrize("name", sorted(DISCRIMINATORS))
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    disc = build_discriminator(name).train()
    side = discriminator_kwargs(name).get("input_size", 24)  # the U-Net takes any side divisible by 8
    check_discriminator(name, "vanilla", side)
    hr = torch.rand(2, 3, side, side)
    logits = disc(hr)
    per_pixel = name.startswith("unet")
    assert logits.shape == ((2, 1, side, side) if per_pixel else (2, 1))
    assert torch.isfinite(logits).all()
    logits.mean().backward()
    grads = [p.grad for p in disc.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_layer_norm_critic_judges_each_sample_alone() -> None:
    """Batch norm mixes the batch (so no per-sample gradient penalty); the -ln variant does not."""
    torch.manual_seed(0)
    hr = torch.rand(3, 3, 128, 128)
    other = hr.clone()
    other[1:] = torch.rand(2, 3, 128, 128)  # same first sample, different batch mates
    for norm, independent in (("batch", False), ("layer", True)):
        disc = build_discriminator("vgg128-nano", norm=norm).train()
        with torch.no_grad():
            same = torch.allclose(disc(hr)[0], disc(other)[0], atol=1e-6)
        assert same == independent, norm
    ln = build_discriminator("vgg128-ln")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ln.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in ln.modules()) == 9


@pytest.mark.parametrize("name,loss,hr_size,message", [
    ("vgg128", "relativistic", 96, "takes 128x128 HR crops but training gives 96x96: set train.crop=32"),
    ("vgg256", "vanilla", 128, "set train.crop=64"),
    ("unet-sn", "vanilla", 60, "divides by 8, got 60"),
    ("vgg128", "wgan-gp", 128, "wgan-gp needs a critic without batch norm"),
    ("vgg128-gan", "vanilla", 128, "unknown discriminator 'vgg128-gan'; known: unet-sn"),
])
def test_setup_problems_are_one_line_errors(name: str, loss: str, hr_size: int, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        check_discriminator(name, loss, hr_size)
    assert "\n" not in str(info.value)


def test_good_setups_pass_and_overrides_are_checked() -> None:
    for name, loss, size in (("vgg128-ln", "wgan-gp", 128), ("unet-sn", "wgan-gp", 64), ("vgg128", "vanilla", 128)):
        check_discriminator(name, loss, size)
    assert discriminator_kwargs("unet-sn", num_feat=32) == {"num_feat": 32, "skip_connection": True}
    with pytest.raises(UserError, match="no argument"):
        build_discriminator("unet-sn", num_feats=3)


def test_help_lists_the_table() -> None:
    """``train --help`` lists discriminators from a name tuple that needs no torch: the table's names, in order."""
    from pipeline.models.names import DISCRIMINATOR_NAMES

    assert DISCRIMINATOR_NAMES == tuple(DISCRIMINATORS)
