"""Training losses as named scalar tensors: pixel, perceptual (VGG19), total variation, adversarial.

Every loss comes back as a dict of scalar tensors with ``loss/...`` keys plus the total the
optimiser steps on. The train stage computes every generator loss (PSNR runs and GAN runs alike)
with ``GeneratorLoss``, whose pixel terms are ``contest_loss``:

- ``contest_loss``: ``loss/total`` = w_l1 * ``loss/l1`` + w_mse * ``loss/mse`` on [0,1] pixels.
- ``GeneratorLoss`` (built from the config by ``build_generator_loss``): ``loss/total`` =
  train.loss_l1 * ``loss/l1`` + train.loss_mse * ``loss/mse`` [+ loss.perceptual * ``loss/perceptual``]
  [+ loss.tv * ``loss/tv``] [+ gan.weight * ``loss/adversarial``]; a term is present only when its
  weight is positive, so the default config gives exactly contest_loss's keys and values.
- ``discriminator_loss``: ``loss/d_total`` = ``loss/d_real`` + ``loss/d_fake`` + gan.gp_weight * ``loss/d_gp``.

Adversarial kinds (logits of any shape: one per image or one per pixel; means run over all of them;
sigma is the logistic function, BCE(x, t) = binary cross-entropy of sigma(x) against t):
- ``vanilla`` (SRGAN): D: BCE(C(hr), 1) + BCE(C(sr), 0); G: BCE(C(sr), 1) (the non-saturating form).
- ``relativistic`` (ESRGAN's relativistic average GAN, the paper's sums without basicsr's 1/2):
  D: BCE(C(hr) - mean C(sr), 1) + BCE(C(sr) - mean C(hr), 0);
  G: BCE(C(hr) - mean C(sr), 0) + BCE(C(sr) - mean C(hr), 1).
- ``wgan-gp``: critic: mean C(sr) - mean C(hr) + gp_weight * GP; G: -mean C(sr).

Images may be (B,C,H,W) or volumes (B,C,D,H,W): the pixel, adversarial and penalty terms take any
number of axes (the perceptual loss is 2-D RGB; total variation runs over every spatial axis).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import Config, GanConfig
from pipeline.models.perceptual import VGGFeatures, load_vgg_features

ADVERSARIAL_KINDS = ("vanilla", "relativistic", "wgan-gp")
_GAN = GanConfig()  # the defaults live in the config schema


def _kind(kind: str) -> str:
    if kind not in ADVERSARIAL_KINDS:
        raise ValueError(f"unknown adversarial loss {kind!r}; choose one of {', '.join(ADVERSARIAL_KINDS)}")
    return kind


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 when autocast made it half precision (fp16/bf16); fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def contest_loss(sr: torch.Tensor, hr: torch.Tensor, w_l1: float, w_mse: float) -> dict[str, torch.Tensor]:
    """w_l1 * L1 + w_mse * MSE on [0,1] pixels (2:1 by default: L1 for sharpness, MSE is the metric)."""
    l1, mse = F.l1_loss(sr, hr), F.mse_loss(sr, hr)
    return {"loss/total": w_l1 * l1 + w_mse * mse, "loss/l1": l1, "loss/mse": mse}


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic L1 total variation of (B,C,*spatial): the sum over spatial axes of the mean |neighbour
    difference| along that axis ((B,C,H,W): vertical + horizontal; volumes add depth)."""
    return sum((x.diff(dim=axis).abs().mean() for axis in range(2, x.dim())), start=x.new_zeros(()))


FEATURE_DISTANCES = {"l1": F.l1_loss, "mse": F.mse_loss}  # loss.perceptual_criterion -> distance of features


def perceptual_loss(vgg: nn.Module, sr: torch.Tensor, hr: torch.Tensor,
                    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum over ``vgg``'s layers of ``distance`` between VGG(sr) and VGG(hr) (the target without gradient)."""
    with torch.no_grad():
        target = vgg(hr)
    feats = vgg(sr)
    return torch.stack([distance(feats[name], target[name]) for name in feats]).sum()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     eps: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP's penalty: mean over samples of (||grad of C at x_hat||_2 - 1)^2.

    x_hat = eps * real + (1 - eps) * fake with eps ~ U[0,1] per sample (or the (B,) ``eps`` given);
    the norm runs over all of a sample's pixels and channels (and slices, for volumes). A critic with a logit map
    (U-Net) scores a sample by the mean of its map, as the losses do. The graph is kept
    (``create_graph``) so the penalty trains the critic.
    """
    if eps is None:
        eps = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
    eps = eps.reshape(-1, *[1] * (real.dim() - 1))  # (B,) -> (B,1,1,1) for images, (B,1,1,1,1) for volumes
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    score = critic(x_hat).flatten(1).mean(1)  # (B,...) -> (B,): one value per sample
    (grad,) = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def discriminator_terms(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (real, fake) parts of the discriminator's loss for ``kind`` (module docstring), without the penalty."""
    if _kind(kind) == "vanilla":
        return _bce(real_logits, 1.0), _bce(fake_logits, 0.0)
    if kind == "relativistic":
        return _bce(real_logits - fake_logits.mean(), 1.0), _bce(fake_logits - real_logits.mean(), 0.0)
    return -real_logits.mean(), fake_logits.mean()


def discriminator_loss(kind: str, critic: nn.Module, hr: torch.Tensor, sr: torch.Tensor,
                       gp_weight: float = _GAN.gp_weight,
                       eps: torch.Tensor | None = None,
                       precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                       ) -> dict[str, torch.Tensor]:
    """One discriminator step's losses on real ``hr`` and generated ``sr`` (detached here: G is not trained).

    The critic's two forwards run inside ``precision()`` (an autocast context, for mixed precision);
    the losses are taken on fp32 logits, and the gradient penalty (interpolation ``eps``, random when
    None) runs outside it in the inputs' precision (fp32 in training): no half-precision gradient
    norm, and no scaler to undo inside the penalty.
    """
    sr = sr.detach()
    with precision():
        real_logits, fake_logits = critic(hr), critic(sr)
    real, fake = discriminator_terms(kind, full_precision(real_logits), full_precision(fake_logits))
    gp = gradient_penalty(critic, hr, sr, eps) if kind == "wgan-gp" else torch.zeros_like(real)
    return {"loss/d_total": real + fake + gp_weight * gp, "loss/d_real": real, "loss/d_fake": fake, "loss/d_gp": gp}


def generator_adversarial(kind: str, fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None,
                          ) -> torch.Tensor:
    """The generator's adversarial term for ``kind``; ``relativistic`` also needs the logits of the HR batch."""
    if _kind(kind) == "vanilla":
        return _bce(fake_logits, 1.0)
    if kind == "relativistic":
        if real_logits is None:
            raise ValueError("the relativistic generator loss needs real_logits (the discriminator on hr)")
        real_logits = real_logits.detach()  # only the generator learns from this loss
        return _bce(real_logits - fake_logits.mean(), 0.0) + _bce(fake_logits - real_logits.mean(), 1.0)
    return -fake_logits.mean()


@dataclass(frozen=True)
class LossMix:
    """How much of each term the generator's loss holds (``loss_mix``: from train.* / loss.* / gan.*);
    0 switches a term off (it is then not computed)."""

    l1: float
    mse: float
    perceptual: float
    tv: float
    adversarial: float


def loss_mix(cfg: Config) -> LossMix:
    """The one place that maps config keys to the generator loss's mix of terms."""
    return LossMix(l1=cfg.train.loss_l1, mse=cfg.train.loss_mse, perceptual=cfg.loss.perceptual, tv=cfg.loss.tv,
                       adversarial=cfg.gan.weight if cfg.gan.discriminator else 0.0)


class GeneratorLoss(nn.Module):
    """Weighted sum of the generator's terms; holds the frozen VGG19 when the perceptual term is on.

    ``forward(sr, hr, fake_logits, real_logits)``: ``sr``/``hr`` (B,3,H,W) in [0,1]; ``fake_logits``
    = D(sr) with the graph to the generator (needed when the adversarial weight is positive),
    ``real_logits`` = D(hr) (relativistic only).
    """

    def __init__(self, mix: LossMix, adversarial: str = "vanilla", vgg: VGGFeatures | None = None,
                 perceptual_criterion: str = "l1") -> None:
        super().__init__()
        if mix.perceptual > 0 and vgg is None:
            raise ValueError("a positive perceptual weight needs the VGG features (build_generator_loss loads them)")
        self.mix = mix
        self.adversarial = _kind(adversarial)
        self.vgg = vgg
        self.feature_distance = FEATURE_DISTANCES[perceptual_criterion]

    def perceptual(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Sum over the chosen layers of the feature distance between VGG19(sr) and VGG19(hr)."""
        assert self.vgg is not None
        return perceptual_loss(self.vgg, sr, hr, self.feature_distance)

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys ``forward`` returns, in order."""
        w = self.mix
        extra = [key for weight, key in ((w.perceptual, "loss/perceptual"), (w.tv, "loss/tv"),
                                         (w.adversarial, "loss/adversarial")) if weight > 0]
        return ("loss/total", "loss/l1", "loss/mse", *extra)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor, fake_logits: torch.Tensor | None = None,
                real_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        w = self.mix
        terms = contest_loss(sr, hr, w.l1, w.mse)
        weighted = []
        if w.perceptual > 0:
            terms["loss/perceptual"] = self.perceptual(sr, hr)
            weighted.append((w.perceptual, "loss/perceptual"))
        if w.tv > 0:
            terms["loss/tv"] = total_variation(sr)
            weighted.append((w.tv, "loss/tv"))
        if w.adversarial > 0:
            if fake_logits is None:
                raise ValueError("a positive adversarial weight needs fake_logits = discriminator(sr)")
            terms["loss/adversarial"] = generator_adversarial(self.adversarial, fake_logits, real_logits)
            weighted.append((w.adversarial, "loss/adversarial"))
        for weight, key in weighted:
            terms["loss/total"] = terms["loss/total"] + weight * terms[key]
        return terms


def build_generator_loss(cfg: Config) -> GeneratorLoss:
    """The generator loss of ``cfg``; loads VGG19 from loss.vgg_weights only when loss.perceptual > 0."""
    mix = loss_mix(cfg)
    vgg = load_vgg_features(cfg.loss.vgg_weights, cfg.loss.perceptual_layers) if mix.perceptual > 0 else None
    return GeneratorLoss(mix, cfg.gan.loss, vgg, cfg.loss.perceptual_criterion)
