"""Adversarial and regularising losses for any number of spatial axes ((B,C,H,W) and (B,C,D,H,W) alike).

- ``gradient_penalty`` (WGAN-GP, Gulrajani et al. 2017): mean over the batch of
  (||grad_x critic(x_hat)||_2 - 1)^2 at x_hat = a*real + (1-a)*fake, one a ~ U(0,1) per sample,
  the norm taken over all of a sample's channels and voxels. Multiply by the penalty weight
  (10 in the paper) outside.
- ``total_variation``: mean absolute difference of neighbouring pixels / voxels along every
  spatial axis, summed over the axes (SRResCycGAN's TV term).
Both are written for N-d tensors so the 2-D GAN losses can share them (see the report: if
``pipeline/losses.py`` gains an N-d gradient penalty, this one should go and callers use that).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP penalty of ``critic`` between ``real`` and ``fake`` (B,C,*spatial); differentiable."""
    if real.shape != fake.shape:
        raise ValueError(f"gradient penalty: real {tuple(real.shape)} and fake {tuple(fake.shape)} differ")
    # One mixing weight per sample, broadcast over channels and every spatial axis: (B,1,1,...)
    alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), generator=generator,
                       device=real.device, dtype=real.dtype)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    scores = critic(mixed)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    # (B,C,*S) -> (B, C*prod(S)): one gradient norm per sample
    norms = grad.flatten(1).norm(2, dim=1)
    return ((norms - 1) ** 2).mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum over spatial axes of the mean |x[i+1] - x[i]| along that axis; x is (B,C,*spatial)."""
    return sum((x.diff(dim=axis).abs().mean() for axis in range(2, x.dim())), start=x.new_zeros(()))
