"""SRResCycGAN's losses and schedule (Umer et al. 2020, the write-up's weights), ready for a training loop.

The four networks (``archs.SRResCycGAN``): ``g_hr`` LR -> HR, ``g_lr`` HR -> LR, ``d_hr``, ``d_lr``.
For an LR batch ``lr`` (B,1,h,w) and an HR batch ``hr`` (B,1,4h,4w), normalised slices:

    sr = g_hr(lr),       lr_cycle = g_lr(sr)         LR -> HR -> LR
    fake_lr = g_lr(hr),  hr_cycle = g_hr(fake_lr)    HR -> LR -> HR

``generator_loss``: ``loss/total`` = perceptual * P + adversarial * A + tv * TV + l1 * L1 + cycle * C
(``mri_cycle_train.*``: 1, 1, 1, 5, 10 as in the write-up), each term also returned as ``loss/<name>``:
- A = adv(d_hr(sr)) + adv(d_lr(fake_lr)), the generator side of ``mri_cycle_train.adversarial_loss``
  (``pipeline.training.losses.generator_adversarial``; relativistic also scores the real batch);
- C = |lr_cycle - lr|_1 + |hr_cycle - hr|_1; TV = ``losses.total_variation(sr)``;
- L1 and P compare with a target where there is one. Paired batches (``paired=True``: ``hr`` is
  the HR of ``lr``): |sr - hr|_1 and P(sr, hr), the write-up's supervised form. Unpaired (the
  default): sr has no target, so L1 = |avg4(sr) - lr|_1 + |fake_lr - avg4(hr)|_1 (each generator
  stays consistent with the fixed 4x4 average its global skip starts from: content is kept while
  the adversarial terms make it realistic) and P = P(hr_cycle, hr).
``discriminator_loss``: ``pipeline.training.losses.discriminator_loss`` on each side (real hr vs sr, real lr
vs fake_lr), summed into ``loss/d_total``.
Schedule (``cycle_schedule``): Adam at ``mri_cycle_train.learning_rate`` (1e-4) for the two generators together and
for the two discriminators together, both halved every ``mri_cycle_train.halve_every`` (10,000) steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.core.config import Config, GanConfig, MriCycleTrainConfig, SectionView, view_of
from pipeline.core.distributed import Dist
from pipeline.core.errors import UserError
from pipeline.models.checkpoint import CheckpointError
from pipeline.mri.archs import SRResCycGAN
from pipeline.training.losses import FEATURE_DISTANCES, generator_adversarial, perceptual_loss, total_variation
from pipeline.training.losses import discriminator_loss as side_loss
from pipeline.training.objectives import Objective, StepContext
from pipeline.training.task import TrainTask
from pipeline.training.updates import Schedule, build_optimizer, load_updates, update, updates_state

Perceptual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pred, target) -> scalar
SCALE = 4  # SRResCycGAN's factor per side (the write-up's 80 -> 320); mri-cycle-train's too
CYCLE_D_KEYS = ("loss/d_total", "loss/d_hr", "loss/d_lr")
_DEFAULTS = MriCycleTrainConfig()  # the defaults live in the config schema, one place


@view_of(MriCycleTrainConfig)
class CycleMix(SectionView):
    """How much of each generator term (``mri_cycle_train.*``); 0 switches a term off (it is then not computed)."""

    perceptual: float
    adversarial: float
    tv: float
    l1: float
    cycle: float


def vgg_perceptual(vgg: torch.nn.Module, criterion: str = "l1") -> Perceptual:
    """P for single-channel slices through ``perceptual.VGGFeatures``: the channel repeated to RGB."""
    distance = FEATURE_DISTANCES[criterion]

    def perceptual(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # (B,1,H,W) -> (B,3,H,W) on both sides
        return perceptual_loss(vgg, pred.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1), distance)
    return perceptual


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, SCALE)  # (B,1,4h,4w) -> (B,1,h,w)


def generator_loss(net: SRResCycGAN, lr: torch.Tensor, hr: torch.Tensor, mix: CycleMix | None = None,
                   kind: str = _DEFAULTS.adversarial_loss, perceptual: Perceptual | None = None,
                   paired: bool = False) -> dict[str, torch.Tensor]:
    """The generators' loss terms and ``loss/total`` (module docstring); also ``sr`` and ``fake_lr`` for the critics."""
    if hr.shape[-2:] != (lr.shape[-2] * SCALE, lr.shape[-1] * SCALE):
        raise ValueError(f"hr {tuple(hr.shape)} must be {SCALE}x lr {tuple(lr.shape)} per side")
    w = mix or CycleMix()  # (the schema's defaults: the write-up's weights)
    if w.perceptual > 0 and perceptual is None:
        raise ValueError("a positive perceptual weight needs the perceptual function (vgg_perceptual)")
    sr = net.g_hr(lr)  # (B,1,h,w) -> (B,1,4h,4w)
    fake_lr = net.g_lr(hr)  # (B,1,4h,4w) -> (B,1,h,w)
    terms: dict[str, torch.Tensor] = {}
    weighted: list[tuple[float, str]] = []
    if w.cycle > 0:
        terms["loss/cycle"] = F.l1_loss(net.g_lr(sr), lr) + F.l1_loss(net.g_hr(fake_lr), hr)
        weighted.append((w.cycle, "loss/cycle"))
    if w.l1 > 0:
        terms["loss/l1"] = (F.l1_loss(sr, hr) if paired
                            else F.l1_loss(_down(sr), lr) + F.l1_loss(fake_lr, _down(hr)))
        weighted.append((w.l1, "loss/l1"))
    if w.perceptual > 0:
        assert perceptual is not None
        terms["loss/perceptual"] = perceptual(sr, hr) if paired else perceptual(net.g_hr(fake_lr), hr)
        weighted.append((w.perceptual, "loss/perceptual"))
    if w.tv > 0:
        terms["loss/tv"] = total_variation(sr)
        weighted.append((w.tv, "loss/tv"))
    if w.adversarial > 0:
        real_hr = net.d_hr(hr) if kind == "relativistic" else None
        real_lr = net.d_lr(lr) if kind == "relativistic" else None
        terms["loss/adversarial"] = (generator_adversarial(kind, net.d_hr(sr), real_hr)
                                     + generator_adversarial(kind, net.d_lr(fake_lr), real_lr))
        weighted.append((w.adversarial, "loss/adversarial"))
    total = sum((weight * terms[key] for weight, key in weighted), start=sr.new_zeros(()))
    return {"loss/total": total, **terms, "sr": sr, "fake_lr": fake_lr}


def discriminator_loss(net: SRResCycGAN, lr: torch.Tensor, hr: torch.Tensor, sr: torch.Tensor,
                       fake_lr: torch.Tensor, kind: str = _DEFAULTS.adversarial_loss,
                       gp_weight: float = GanConfig().gp_weight) -> dict[str, torch.Tensor]:
    """Both discriminators' losses: real ``hr`` vs ``sr`` on the HR side, real ``lr`` vs ``fake_lr`` on the LR side."""
    hr_side = side_loss(kind, net.d_hr, hr, sr, gp_weight)
    lr_side = side_loss(kind, net.d_lr, lr, fake_lr, gp_weight)
    return {"loss/d_total": hr_side["loss/d_total"] + lr_side["loss/d_total"],
            "loss/d_hr": hr_side["loss/d_total"], "loss/d_lr": lr_side["loss/d_total"]}


class CycleObjective(Objective):
    """The train stage's ``cycle`` objective: one SRResCycGAN step on an unpaired (LR, HR) batch.

    The Trainer's generator is the whole ``SRResCycGAN`` (its ``forward`` is ``g_hr``, so validation,
    best.pth and mri-infer treat it as the slice model it is); the Trainer's optimizer updates the two
    generators (the discriminators carry no gradient when it steps: Adam skips them), this objective's
    own Adam the two discriminators. Per step: ``generator_loss`` (the discriminators frozen), one
    generator update, then ``discriminator_loss`` on the detached outputs, one discriminator update.
    Both learning rates are ``mri_cycle_train.learning_rate`` halved every ``mri_cycle_train.halve_every`` steps
    (``cycle_schedule``: the objective's schedule, so the Trainer's schedulers set both). One process
    only: the four networks are called directly, not through DistributedDataParallel.
    """

    name = "cycle"

    def __init__(self, cfg: Config, task: TrainTask, d: Dist) -> None:
        self.schedule = cycle_schedule(cfg.mri_cycle_train)
        if d.world > 1:
            raise UserError("SRResCycGAN training runs in one process; start it without torchrun")
        net = task.generator
        if not isinstance(net, SRResCycGAN):
            raise UserError(f"the cycle objective trains SRResCycGAN, not {type(net).__name__}")
        c = self.c = cfg.mri_cycle_train
        self.net, self.mix = net, CycleMix.from_config(c)
        self.perceptual = None
        if c.perceptual > 0:
            if not cfg.loss.vgg_weights:
                raise UserError("mri_cycle_train.perceptual > 0 needs loss.vgg_weights (torchvision's "
                                "vgg19-dcbb9e9d.pth); or set mri_cycle_train.perceptual=0")
            from pipeline.models.perceptual import load_vgg_features

            vgg = load_vgg_features(cfg.loss.vgg_weights, cfg.loss.perceptual_layers).to(d.device)
            self.perceptual = vgg_perceptual(vgg, cfg.loss.perceptual_criterion)
        self.optimizer = build_optimizer(cfg.train, net.d_hr, d.device, c.learning_rate)
        self.optimizer.add_param_group({"params": list(net.d_lr.parameters())})
        self.scheduler = self.schedule.build(self.optimizer)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=False)  # fp32: SRResCycGAN steps run eager
        w = self.mix
        terms = [key for weight, key in ((w.cycle, "loss/cycle"), (w.l1, "loss/l1"), (w.perceptual, "loss/perceptual"),
                                         (w.tv, "loss/tv"), (w.adversarial, "loss/adversarial")) if weight > 0]
        self.keys = ("loss/total", *terms, *CYCLE_D_KEYS)
        self.bar = {"g": "loss/total", "cyc": "loss/cycle", "d": "loss/d_total"}

    def schedulers(self) -> list[Any]:
        return [self.scheduler]

    def step(self, tr: StepContext, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        net, kind = self.net, self.c.adversarial_loss
        discriminators = (net.d_hr, net.d_lr)
        for d in discriminators:
            d.requires_grad_(False)  # the generators' backward leaves the discriminators alone
        try:
            with tr.section("loss"):
                losses = generator_loss(net, lr, hr, self.mix, kind, self.perceptual)
            update(losses["loss/total"], tr.optimizer, tr.scaler, net.generators(), tr.train.grad_clip, tr.section)
        finally:
            for d in discriminators:
                d.requires_grad_(True)
        with tr.section("discriminator"):
            d_losses = discriminator_loss(net, lr, hr, losses["sr"].detach(), losses["fake_lr"].detach(), kind,
                                          tr.cfg.gan.gp_weight)
            update(d_losses["loss/d_total"], self.optimizer, self.scaler, net.discriminators(), 0.0)
        return {**{k: losses[k] for k in self.keys if k in losses}, **d_losses}

    def model_checkpoint(self) -> dict[str, Any]:
        return {"objective": self.name}

    def state_dict(self) -> dict[str, Any]:
        return updates_state(self.optimizer, self.scheduler, self.scaler, "d_")

    def load_state_dict(self, state: dict[str, Any], path: Any) -> None:
        try:
            load_updates(state, self.optimizer, self.scheduler, self.scaler, "d_")
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: does not fit this run's discriminators: {str(exc)[:300]}") from None


def cycle_schedule(c: MriCycleTrainConfig) -> Schedule:
    """The write-up's schedule: the learning rate halved every ``mri_cycle_train.halve_every`` steps."""
    return Schedule("step", period=c.halve_every, gamma=0.5)


def cycle_objective(cfg: Config, task: TrainTask, d: Dist, dtype: torch.dtype | None,
                    total_steps: int) -> CycleObjective:
    """The builder a task hands the train stage (``TrainTask.objective``)."""
    return CycleObjective(cfg, task, d)
