"""WDSR-A and WDSR-B (Yu et al. 2018, "Wide Activation for Efficient and Accurate Image Super-Resolution").

Written here because no maintained package ships them. The paper's structure:
- every convolution is weight-normalised (no batch norm), residual blocks without a final body conv;
- WDSR-A block: 3x3 conv that widens the features ``expansion`` times, ReLU, 3x3 conv back;
  the activation sees the wide features, the identity path stays narrow;
- WDSR-B block: 1x1 conv to ``expansion`` x the features, ReLU, low-rank 1x1 conv to
  ``low_rank`` x the features (no activation), 3x3 conv back: wider activation for the same cost;
- head 3x3 conv -> blocks -> tail 3x3 conv to 3*scale^2 channels -> one pixel shuffle x scale,
  plus a skip branch from the input (5x5 conv -> pixel shuffle) added to the output;
- input normalised as the authors' code does: (x - DIV2K mean) / 0.5 in, the inverse out.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

# DIV2K RGB mean on [0,1], the normalisation of the authors' code (and of basicsr's EDSR).
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)


def _conv(c_in: int, c_out: int, kernel: int) -> nn.Module:
    return weight_norm(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2))


class BlockA(nn.Module):
    """Wide activation: 3x3 widen -> ReLU -> 3x3 narrow, scaled and added to the input."""

    def __init__(self, num_feat: int, expansion: int, res_scale: float) -> None:
        super().__init__()
        wide = num_feat * expansion
        self.body = nn.Sequential(_conv(num_feat, wide, 3), nn.ReLU(inplace=True), _conv(wide, num_feat, 3))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class BlockB(nn.Module):
    """Wide activation, cheap: 1x1 widen -> ReLU -> 1x1 low-rank -> 3x3 back, scaled and added."""

    def __init__(self, num_feat: int, expansion: int, low_rank: float, res_scale: float) -> None:
        super().__init__()
        wide, narrow = num_feat * expansion, max(1, int(num_feat * low_rank))
        self.body = nn.Sequential(_conv(num_feat, wide, 1), nn.ReLU(inplace=True), _conv(wide, narrow, 1),
                                  _conv(narrow, num_feat, 3))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class WDSR(nn.Module):
    """Head, residual body of ``blocks``, pixel-shuffle tail, and a 5x5 skip branch from the input."""

    def __init__(self, blocks: list[nn.Module], num_feat: int, scale: int) -> None:
        super().__init__()
        out = 3 * scale * scale
        self.head = _conv(3, num_feat, 3)
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Sequential(_conv(num_feat, out, 3), nn.PixelShuffle(scale))
        self.skip = nn.Sequential(_conv(3, out, 5), nn.PixelShuffle(scale))
        self.register_buffer("mean", torch.tensor(DIV2K_MEAN).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / 0.5
        # tail and skip: (B,3,h,w) -> (B,3*s*s,h,w) -> pixel shuffle -> (B,3,s*h,s*w)
        out = self.tail(self.body(self.head(x))) + self.skip(x)
        return out * 0.5 + self.mean


def wdsr_a(num_feat: int, num_block: int, expansion: int, res_scale: float, scale: int) -> WDSR:
    """WDSR-A: ``num_block`` A blocks of ``num_feat`` features widened ``expansion`` times."""
    return WDSR([BlockA(num_feat, expansion, res_scale) for _ in range(num_block)], num_feat, scale)


def wdsr_b(num_feat: int, num_block: int, expansion: int, low_rank: float, res_scale: float, scale: int) -> WDSR:
    """WDSR-B: ``num_block`` B blocks (1x1 widen by ``expansion``, 1x1 to ``low_rank`` x features, 3x3)."""
    blocks = [BlockB(num_feat, expansion, low_rank, res_scale) for _ in range(num_block)]
    return WDSR(blocks, num_feat, scale)
