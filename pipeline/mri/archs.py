"""Networks for volumes and slices: mDCSRN, a convolutional critic (2-D or 3-D), SRResCycGAN.

Tensors are (B,C,D,H,W) for volumes and (B,C,H,W) for slices, intensities normalised per volume
(``volumes.IntensityStats``), single channel.

- ``MDCSRN`` (Chen et al., MICCAI 2018): a 3x3x3 head conv to 2k features; ``blocks`` dense
  blocks of ``units`` BN-ELU-Conv3d(3x3x3, k) units, each unit seeing the concatenation of the
  block input and every earlier unit; after each block a 1x1x1 compressor back to 2k; the head
  and every compressor output (all levels) are concatenated into a 1x1x1 reconstruction, added
  to the input (same grid in and out: the LR is k-space truncated or interpolated to the HR grid).
  b4u4, k=16 (the paper's size) has 0.40M parameters.
- ``ConvCritic``: strided conv stages and a global average, so any patch size gives one score per
  sample. As the 3-D WGAN-GP critic it uses layer norm or none, never batch norm: the gradient
  penalty constrains the gradient of each sample's score with respect to that sample, and batch
  norm makes every score depend on the whole batch (Gulrajani et al. 2017 replace it with layer
  norm for this reason). As SRResCycGAN's 2-D discriminators it may use batch norm.
- ``SRResCycGAN`` (Umer et al. 2020) on single-channel slices, 4x: ``g_hr`` (LR -> HR) an encoder
  ending in a 4x transposed convolution, a residual network and a decoder, added to the bicubic
  upscale of the input; ``g_lr`` (HR -> LR, the learned degradation) a conv, a residual network
  and two stride-2 convolutions, added to the 4x4 average of the input; ``d_hr`` / ``d_lr`` one
  discriminator per side. The global skips (bicubic / average) are ours: the generators learn
  the difference from a fixed resampling, same optimum, faster start. ``forward`` is ``g_hr``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["layer", "batch", "none"]


class DenseBlock3d(nn.Module):
    """``units`` BN-ELU-Conv3d units with dense connections; returns input and every unit, concatenated."""

    def __init__(self, channels: int, growth: int, units: int) -> None:
        super().__init__()
        self.units = nn.ModuleList(
            nn.Sequential(nn.BatchNorm3d(channels + i * growth), nn.ELU(),
                          nn.Conv3d(channels + i * growth, growth, 3, padding=1))
            for i in range(units))
        self.out_channels = channels + units * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for unit in self.units:
            features.append(unit(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)  # (B,C,D,H,W) -> (B,C+units*growth,D,H,W)


class MDCSRN(nn.Module):
    """3-D multi-level densely connected SR network; (B,C,D,H,W) -> (B,C,D,H,W), residual to the input."""

    def __init__(self, in_channels: int = 1, growth: int = 16, blocks: int = 4, units: int = 4) -> None:
        super().__init__()
        width = 2 * growth
        self.head = nn.Conv3d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(DenseBlock3d(width, growth, units) for _ in range(blocks))
        self.compressors = nn.ModuleList(nn.Conv3d(width + units * growth, width, 1) for _ in range(blocks))
        self.reconstruct = nn.Conv3d(width * (blocks + 1), in_channels, 1)
        # Voxels of context one output voxel sees along each side (head + one 3x3x3 per unit):
        # the margin the N-d tiler needs for tiled == whole-volume inference.
        self.receptive_radius = 1 + blocks * units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = self.head(x)
        levels = [level]
        for block, compress in zip(self.blocks, self.compressors):
            level = compress(block(level))
            levels.append(level)
        # (B,2k*(blocks+1),D,H,W) -> (B,C,D,H,W)
        return x + self.reconstruct(torch.cat(levels, dim=1))


_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _norm(kind: Norm, dims: int, channels: int) -> nn.Module:
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # one group = layer norm over channels and space, per sample
    if kind == "batch":
        return _BATCH_NORM[dims](channels)
    return nn.Identity()


class ConvCritic(nn.Module):
    """Critic / discriminator on (B,C,*spatial) with ``dims`` spatial axes -> (B,1) scores."""

    def __init__(self, dims: Literal[2, 3] = 3, in_channels: int = 1, width: int = 32, stages: int = 4,
                 norm: Norm = "layer") -> None:
        super().__init__()
        conv = _CONV[dims]
        layers: list[nn.Module] = [conv(in_channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for stage in range(stages):
            out = width * 2 ** min(stage + 1, 3)  # double per stage up to 8x width
            layers += [conv(channels, out, 3, stride=2, padding=1), _norm(norm, dims, out), nn.LeakyReLU(0.2),
                       conv(out, out, 3, padding=1), _norm(norm, dims, out), nn.LeakyReLU(0.2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = _POOL[dims](1)
        self.score = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B,C,*S) -> (B,F,*S/2^stages) -> (B,F,1,..) -> (B,F) -> (B,1)
        return self.score(self.pool(self.features(x)).flatten(1))


class ResBlock2d(nn.Module):
    """conv-PReLU-conv with an identity skip."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.PReLU(features),
                                  nn.Conv2d(features, features, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _resnet(features: int, blocks: int) -> nn.Module:
    return nn.Sequential(*(ResBlock2d(features) for _ in range(blocks)), nn.Conv2d(features, features, 3, padding=1))


class HRGenerator(nn.Module):
    """LR slice -> HR slice: encoder with a ``scale``x transposed conv, residual network, decoder."""

    def __init__(self, in_channels: int = 1, features: int = 64, blocks: int = 5, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        # Transposed conv with kernel 2s, stride s, padding s/2: (h-1)s - s + 2s = s*h exactly.
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, features, 3, padding=1), nn.PReLU(features),
            nn.ConvTranspose2d(features, features, 2 * scale, stride=scale, padding=scale // 2), nn.PReLU(features))
        self.body = _resnet(features, blocks)
        self.decoder = nn.Conv2d(features, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)  # (B,C,h,w) -> (B,C,4h,4w)
        feat = self.encoder(x)  # (B,C,h,w) -> (B,F,4h,4w)
        return up + self.decoder(feat + self.body(feat))


class LRGenerator(nn.Module):
    """HR slice -> LR slice (the learned degradation): conv, residual network, two stride-2 convs."""

    def __init__(self, in_channels: int = 1, features: int = 64, blocks: int = 5) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(in_channels, features, 3, padding=1), nn.PReLU(features))
        self.body = _resnet(features, blocks)
        self.down = nn.Sequential(
            nn.Conv2d(features, features, 3, stride=2, padding=1), nn.PReLU(features),  # (B,F,H,W) -> (B,F,H/2,W/2)
            nn.Conv2d(features, in_channels, 3, stride=2, padding=1))  # -> (B,C,H/4,W/4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.head(x)
        return F.avg_pool2d(x, 4) + self.down(feat + self.body(feat))  # (B,C,H,W) -> (B,C,H/4,W/4)


class SRResCycGAN(nn.Module):
    """The four networks of SRResCycGAN; ``forward(lr)`` is the HR generator (inference)."""

    def __init__(self, in_channels: int = 1, features: int = 64, blocks: int = 5, disc_width: int = 32,
                 disc_stages: int = 4, disc_norm: Norm = "batch") -> None:
        super().__init__()
        self.g_hr = HRGenerator(in_channels, features, blocks, scale=4)
        self.g_lr = LRGenerator(in_channels, features, blocks)
        self.d_hr = ConvCritic(2, in_channels, disc_width, disc_stages, disc_norm)
        self.d_lr = ConvCritic(2, in_channels, disc_width, disc_stages, disc_norm)

    def generators(self) -> list[nn.Parameter]:
        return [*self.g_hr.parameters(), *self.g_lr.parameters()]

    def discriminators(self) -> list[nn.Parameter]:
        return [*self.d_hr.parameters(), *self.d_lr.parameters()]

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.g_hr(lr)  # (B,C,h,w) -> (B,C,4h,4w)
