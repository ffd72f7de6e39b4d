"""The discriminator table: name -> builder and keyword arguments (basicsr's networks, via pipeline.core.compat).

Every discriminator maps an HR-sized image (B,3,H,W) in [0,1] to logits: ``vgg*`` to one logit per
image (B,1), ``unet-sn*`` to one logit per pixel (B,1,H,W). The adversarial losses (pipeline.training.losses)
average over whatever shape comes back.

Input sizes: SRGAN's VGG-style discriminator ends in a dense layer over a 4x4 map after five (or
six) stride-2 stages, so it takes exactly ``input_size`` = 128 (or 256) pixel squares: the HR crops
the generator is trained on must be that size (``train.crop`` = 32 LR pixels for 128, or
``patchify.size=128`` with ``train.crop=0``). The U-Net discriminator takes any size divisible by 8
(three stride-2 stages, then skip connections at each scale). ``check_discriminator`` says so
before training starts instead of failing inside the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from pipeline.core.compat import UNetDiscriminatorSN, VGGStyleDiscriminator
from pipeline.core.errors import UserError
from pipeline.models.table import SCALE


def _vgg(num_feat: int, input_size: int, norm: Literal["batch", "layer"]) -> nn.Module:
    net = VGGStyleDiscriminator(num_in_ch=3, num_feat=num_feat, input_size=input_size)
    if norm == "layer":
        # WGAN-GP penalises each sample's gradient; batch norm couples the samples of a batch, so the
        # critic uses layer norm instead (the WGAN-GP paper's advice): GroupNorm with one group.
        for name, child in list(net.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(net, name, nn.GroupNorm(1, child.num_features))
    return net


def _unet(num_feat: int, skip_connection: bool) -> nn.Module:
    return UNetDiscriminatorSN(num_in_ch=3, num_feat=num_feat, skip_connection=skip_connection)


@dataclass(frozen=True)
class DiscriminatorSpec:
    builder: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    multiple: int = 1  # input sides must divide by this (the VGG discriminator's fixed size is in kwargs)


DISCRIMINATORS: dict[str, DiscriminatorSpec] = {
    "vgg128": DiscriminatorSpec(_vgg, dict(num_feat=64, input_size=128, norm="batch"),
                                "SRGAN/ESRGAN VGG-style discriminator, 128x128 HR crops, batch norm"),
    "vgg256": DiscriminatorSpec(_vgg, dict(num_feat=64, input_size=256, norm="batch"),
                                "VGG-style discriminator for 256x256 HR crops"),
    "vgg128-ln": DiscriminatorSpec(_vgg, dict(num_feat=64, input_size=128, norm="layer"),
                                   "VGG-style critic with layer norm instead of batch norm (for WGAN-GP)"),
    "vgg128-nano": DiscriminatorSpec(_vgg, dict(num_feat=4, input_size=128, norm="batch"),
                                     "VGG-style discriminator, 4 base features (tests)"),
    "unet-sn": DiscriminatorSpec(_unet, dict(num_feat=64, skip_connection=True),
                                 "Real-ESRGAN's U-Net discriminator with spectral norm, per-pixel logits", 8),
    "unet-sn-nano": DiscriminatorSpec(_unet, dict(num_feat=4, skip_connection=True),
                                      "U-Net discriminator with spectral norm, 4 base features (tests)", 8),
}


def _spec(name: str) -> DiscriminatorSpec:
    if name not in DISCRIMINATORS:
        raise UserError(f"unknown discriminator {name!r}; known: {', '.join(sorted(DISCRIMINATORS))}")
    return DISCRIMINATORS[name]


def discriminator_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The full keyword arguments of ``name`` with ``overrides`` (what a checkpoint stores to rebuild it)."""
    spec = _spec(name)
    unknown = set(overrides) - set(spec.kwargs)
    if unknown:
        raise UserError(f"discriminator {name!r} has no argument(s) {sorted(unknown)}; it takes {sorted(spec.kwargs)}")
    return {**spec.kwargs, **overrides}


def build_discriminator(name: str, **overrides: Any) -> nn.Module:
    """Build a discriminator from the table; ``overrides`` replace its keyword arguments."""
    return _spec(name).builder(**discriminator_kwargs(name, **overrides))


def check_discriminator(name: str, loss: str, hr_size: int) -> None:
    """A UserError if discriminator ``name`` cannot judge ``hr_size`` square HR crops or be a ``loss`` critic."""
    spec = _spec(name)
    fixed = spec.kwargs.get("input_size")
    if fixed is not None and hr_size != fixed:
        raise UserError(f"gan.discriminator={name} takes {fixed}x{fixed} HR crops but training gives {hr_size}x"
                        f"{hr_size}: set train.crop={fixed // SCALE} (LR pixels) or pick a unet-sn discriminator")
    if hr_size % spec.multiple:
        raise UserError(f"gan.discriminator={name} needs HR crops whose side divides by {spec.multiple}, "
                        f"got {hr_size}: change train.crop or patchify.size")
    if loss == "wgan-gp" and spec.kwargs.get("norm") == "batch":
        raise UserError(f"gan.loss=wgan-gp needs a critic without batch norm (the gradient penalty is per "
                        f"sample); gan.discriminator={name} has it: use vgg128-ln or unet-sn")
