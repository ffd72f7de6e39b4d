"""Regularising losses for any number of spatial axes ((B,C,H,W) and (B,C,D,H,W) alike).

- ``total_variation``: mean absolute difference of neighbouring pixels / voxels along every
  spatial axis, summed over the axes (SRResCycGAN's TV term).
The WGAN-GP penalty is ``pipeline.losses.gradient_penalty``, N-d already (the 3-D critic's too).
"""

from __future__ import annotations

import torch


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum over spatial axes of the mean |x[i+1] - x[i]| along that axis; x is (B,C,*spatial)."""
    return sum((x.diff(dim=axis).abs().mean() for axis in range(2, x.dim())), start=x.new_zeros(()))
