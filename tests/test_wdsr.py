"""WDSR-A / WDSR-B follow the paper's structure; SRResNet is basicsr's MSRResNet (forward/backward of every
preset is in test_models.py, which runs the whole table)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.compat import MSRResNet
from pipeline.models.table import build_model
from pipeline.models.wdsr import DIV2K_MEAN, BlockA, BlockB


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_block_a_widens_before_the_activation() -> None:
    model = build_model("wdsr-a", num_feat=8, num_block=2, expansion=4)
    blocks = [m for m in model.modules() if isinstance(m, BlockA)]
    assert len(blocks) == 2
    first, act, last = blocks[0].body
    assert (first.in_channels, first.out_channels, first.kernel_size) == (8, 32, (3, 3))
    assert isinstance(act, nn.ReLU)
    assert (last.in_channels, last.out_channels, last.kernel_size) == (32, 8, (3, 3))


def test_block_b_is_wide_1x1_low_rank_1x1_then_3x3() -> None:
    model = build_model("wdsr-b", num_feat=10, num_block=1, expansion=6, low_rank=0.8)
    (block,) = [m for m in model.modules() if isinstance(m, BlockB)]
    wide, act, low, out = block.body
    assert (wide.in_channels, wide.out_channels, wide.kernel_size) == (10, 60, (1, 1))
    assert isinstance(act, nn.ReLU)
    assert (low.in_channels, low.out_channels, low.kernel_size) == (60, 8, (1, 1))  # int(10 * 0.8)
    assert (out.in_channels, out.out_channels, out.kernel_size) == (8, 10, (3, 3))


def test_every_wdsr_conv_is_weight_normalised_and_there_is_no_batch_norm() -> None:
    for name in ("wdsr-a-nano", "wdsr-b-nano"):
        model = build_model(name)
        convs = _convs(model)
        assert convs and all(hasattr(c, "parametrizations") and "weight" in c.parametrizations for c in convs)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_skip_branch_from_the_input_and_pixel_shuffle_x4() -> None:
    """With the tail silenced, the output is exactly the 5x5 skip conv of the normalised input, shuffled x4."""
    torch.manual_seed(0)
    model = build_model("wdsr-b-nano").eval()
    tail_conv = model.tail[0]
    with torch.no_grad():
        tail_conv.parametrizations.weight.original0.zero_()  # weight-norm magnitude g = 0
        tail_conv.bias.zero_()
    lr = torch.rand(1, 3, 6, 7)
    mean = torch.tensor(DIV2K_MEAN).view(1, 3, 1, 1)
    skip = model.skip[0]
    expected = F.pixel_shuffle(F.conv2d((lr - mean) / 0.5, skip.weight, skip.bias, padding=2), 4) * 0.5 + mean
    with torch.no_grad():
        sr = model(lr)  # (1,3,6,7) -> (1,3,24,28)
    assert sr.shape == (1, 3, 24, 28)
    torch.testing.assert_close(sr, expected)


def test_srresnet_is_basicsrs_msrresnet() -> None:
    model = build_model("srresnet-nano")
    assert isinstance(model, MSRResNet) and model.upscale == 4
