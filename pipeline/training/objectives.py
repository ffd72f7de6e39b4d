"""What a training step optimises: the objective table of the train stage.

The Trainer (pipeline/training/loop.py) runs the loop, checkpoints, resume, EMA, validation,
logging, signals and DDP for every objective; an ``Objective`` owns one step's arithmetic and the
state only it has. ``OBJECTIVES`` maps a name to its builder; ``objective_name(cfg)`` picks it:

- ``psnr`` (``PixelObjective``): the generator loss (``pipeline.training.losses.GeneratorLoss``: 2 L1 + MSE
  by default, plus perceptual / TV terms when weighted), one generator update per step; the step
  may be compiled (train.compile); best.pth = best validation PSNR.
- ``gan`` (``GanObjective``, on when gan.discriminator names one): per step, gan.critic_steps
  discriminator updates on the step's batch (its own optimizer, scheduler and gradient scaler;
  the gradient penalty's interpolation is a function of seed and step), then one generator update
  with the adversarial term added. The step runs eager. best.pth: see ``best_rule``.
- a task's own objective (``TrainTask.objective``, not in the table), e.g.
  ``pipeline.mri.cycle.CycleObjective``: SRResCycGAN's two generators and two discriminators on
  unpaired LR / HR slices.

An objective's ``step`` returns its losses (``keys``, in order); ``weights`` / ``state_dict`` are
merged into best.pth / last.pth; ``diverged`` may stop the run at a log point.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from timm.scheduler.scheduler import Scheduler
from torch import nn

from pipeline.core.config import Config, TrainConfig
from pipeline.core.distributed import Dist, wrap_ddp
from pipeline.core.errors import UserError
from pipeline.core.runtime import autocast
from pipeline.models.checkpoint import CheckpointError, load_checkpoint, state_dict_from, weights_key
from pipeline.models.table import count_parameters
from pipeline.training.compile import StepCompiler
from pipeline.training.losses import GeneratorLoss, build_generator_loss, discriminator_loss, full_precision, loss_mix
from pipeline.training.task import TrainTask
from pipeline.training.updates import Schedule, build_optimizer, load_updates, update, updates_state

D_KEYS = ("loss/d_total", "loss/d_real", "loss/d_fake", "loss/d_gp")


class StepContext(Protocol):
    """What a step reads of the loop (the ``Trainer`` of pipeline/training/loop.py, which imports this module)."""

    cfg: Config  # the run's settings
    train: TrainConfig  # the train settings in force (the phase's, under train.phases)
    device: torch.device
    dtype: torch.dtype | None
    model: nn.Module  # the generator as the step runs it (DDP-wrapped under torchrun)
    raw: nn.Module  # the generator itself (its parameters, for clipping)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    compiler: StepCompiler
    step: int

    def section(self, name: str) -> contextlib.AbstractContextManager: ...


# -- the objectives ---------------------------------------------------------------------------------


class Objective:
    """What a step optimises; the defaults are those of an objective without state of its own."""

    name = ""
    compiles = False  # train.compile may compile the generator's forward and backward
    phased = False  # train.phases may change its loss mix and learning rate between stretches of the run
    best_by = "psnr"  # what best.pth keeps: psnr, lpips or last (gan.best)
    note = ""  # what ``diverged`` found worth saying without stopping; the Trainer says it once (take_note)

    def __init__(self, loss: GeneratorLoss, schedule: Schedule) -> None:
        self.loss = loss
        self.schedule = schedule  # the learning-rate schedule of every optimizer of the run
        self.keys: tuple[str, ...] = loss.keys  # the losses ``step`` returns, in this order
        self.bar = {"loss": "loss/total"}  # progress-bar label -> loss key

    def step(self, tr: StepContext, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step on a batch (``lr``, ``hr`` on the device); returns the losses."""
        raise NotImplementedError

    def schedulers(self) -> list[Scheduler]:
        """Learning-rate schedulers besides the generator's (``schedule``'s, stepped and re-timed with it)."""
        return []

    def parameters(self) -> list[torch.Tensor]:
        """Trained tensors besides the generator's (checked to be finite before each save)."""
        return []

    def model_checkpoint(self) -> dict[str, Any]:
        """Entries added to best.pth and history checkpoints."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Entries added to last.pth."""
        return {}

    def load_state_dict(self, state: dict[str, Any], path: Any) -> None:
        """Restore from a last.pth written by the same objective (``path`` names it in errors)."""

    def diverged(self, values: dict[str, float], step: int) -> str | None:
        """Called at each log point with the finite mean losses: a reason to stop, or None."""
        return None

    @property
    def healthy(self) -> bool:
        """False while a divergence is suspected: periodic saves wait, so last.pth stays from before it."""
        return True

    def take_note(self) -> str:
        """What the last ``diverged`` call found worth saying without stopping ('' = nothing), once."""
        note, self.note = self.note, ""
        return note

    def enter_phase(self, cfg: Config, device: torch.device) -> None:
        """A new phase of train.phases begins with the settings ``cfg`` (only when ``phased``)."""

    def describe(self) -> str:
        """What the run's start line adds about this objective ('' = nothing)."""
        return ""

    def rate_settings(self, cfg: Config) -> str:
        """The learning-rate settings that drive this objective's updates, for a divergence message."""
        return f"train.learning_rate={cfg.train.learning_rate:g}"


class PixelObjective(Objective):
    """Today's PSNR training: the generator loss and one generator update per step."""

    name = "psnr"
    compiles = True
    phased = True

    def __init__(self, loss: GeneratorLoss, schedule: Schedule, blowup: float, points: int = 1) -> None:
        super().__init__(loss, schedule)
        self.blowup, self.points = blowup, points  # train.blowup, train.blowup_points
        self.lowest = math.inf  # the lowest log-point loss of this session with this loss mix
        self.spike: list[tuple[int, float]] = []  # (step, loss) of the log points of a spike in progress

    def enter_phase(self, cfg: Config, device: torch.device) -> None:
        if loss_mix(cfg) != self.loss.mix:
            self.lowest = math.inf  # another mix of terms (an L2 phase): another scale of loss
            self.spike = []
        self.loss = build_generator_loss(cfg).to(device)  # the phase's mix (an L2 phase: loss_l1=0, loss_mse=1)

    def diverged(self, values: dict[str, float], step: int) -> str | None:
        """A finite blow-up: the log point's mean loss has stayed above train.blowup times the lowest one so
        far for train.blowup_points log points. A spike that comes back sooner is survived (``note``)."""
        total = values["loss/total"]
        if self.blowup and total > self.blowup * self.lowest:
            self.spike.append((step, total))
            if len(self.spike) < self.points:
                return None
            first, times = self.spike[0][0], total / self.lowest
            return (f"training blew up at step {first}: loss/total stayed above {self.blowup:g}x the lowest so far "
                    f"({self.lowest:.4g}) for {len(self.spike)} log point(s) (now {total:.4g}, {times:.0f}x; "
                    f"train.blowup={self.blowup:g}, train.blowup_points={self.points}): lower train.learning_rate "
                    "or set train.grad_clip")
        if self.spike:
            peak = max(loss for _, loss in self.spike)
            self.note = (f"step {self.spike[0][0]}: a loss spike ({peak:.4g}, {peak / self.lowest:.0f}x the lowest "
                         f"so far) came back below {self.blowup:g}x within {len(self.spike)} log point(s); training "
                         "goes on (train.blowup_points)")
            self.spike = []
        self.lowest = min(self.lowest, total)
        return None

    @property
    def healthy(self) -> bool:
        return not self.spike

    def step(self, tr: StepContext, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        tr.compiler.begin_step()
        with tr.section("forward"), autocast(tr.device, tr.dtype):
            sr = tr.compiler.call(lr)  # (b,3,h,w) -> (b,3,4h,4w)
        with tr.section("loss"):
            losses = self.loss(sr.float(), hr)  # fp32 loss whatever the autocast
        update(losses["loss/total"], tr.optimizer, tr.scaler, tr.raw.parameters(), tr.train.grad_clip, tr.section)
        return losses


def best_rule(cfg: Config) -> str:
    """What best.pth keeps in a GAN run (gan.best): ``auto`` = ``lpips`` when evaluate.lpips_weights
    is given, else ``last``. Validation PSNR falls as the GAN sharpens, so the best-PSNR weights
    are the least adversarial ones (near the PSNR start); LPIPS measures what the GAN is for, and
    without it the newest weights are the ones the run was asked to make."""
    rule = cfg.gan.best
    if rule == "auto":
        return "lpips" if cfg.evaluate.lpips_weights else "last"
    if rule == "lpips" and not cfg.evaluate.lpips_weights:
        raise UserError("gan.best=lpips needs evaluate.lpips_weights (torchvision's alexnet-owt-7be5be79.pth "
                        "for evaluate.lpips_net=alex); or use gan.best=last")
    return rule


class CriticLoss(nn.Module):
    """The discriminator's loss as one module: DistributedDataParallel then sees one forward and one
    backward per update, the gradient penalty's double backward included."""

    def __init__(self, critic: nn.Module, kind: str, gp_weight: float,
                 precision: Callable[[], contextlib.AbstractContextManager]) -> None:
        super().__init__()
        self.critic, self.kind, self.gp_weight, self.precision = critic, kind, gp_weight, precision

    def forward(self, hr: torch.Tensor, sr: torch.Tensor, eps: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return discriminator_loss(self.kind, self.critic, hr, sr, self.gp_weight, eps, self.precision)


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def distributed_critic(critic: nn.Module, d: Dist, name: str) -> nn.Module:
    """Batch norm under several processes: each rank would normalise its share of the batch alone,
    so on GPUs it becomes SyncBatchNorm (statistics of the global batch, as one process computes
    them); SyncBatchNorm has no CPU kernel, so on CPUs such a discriminator is refused."""
    if d.world == 1 or not _has_batch_norm(critic):
        return critic
    if d.device.type != "cuda":
        raise UserError(f"gan.discriminator={name} has batch norm, which several CPU processes cannot "
                        "synchronise (SyncBatchNorm needs GPUs): use vgg128-ln or unet-sn under torchrun on CPUs")
    return nn.SyncBatchNorm.convert_sync_batchnorm(critic)


def load_discriminator(critic: nn.Module, path: str) -> None:
    """gan.pretrained: the ``discriminator`` entry of one of our checkpoints, or a basicsr net_d file."""
    state = load_checkpoint(path)
    inner = state.get("discriminator")
    weights = state_dict_from(inner if isinstance(inner, dict) else state, path, weights_key(ema=False))
    try:
        critic.load_state_dict(weights)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"gan.pretrained={path}: weights do not fit the discriminator: {first}") from None


class GanObjective(Objective):
    """Adversarial fine-tuning: critic updates, then the generator with the adversarial term."""

    name = "gan"

    def __init__(self, loss: GeneratorLoss, schedule: Schedule, cfg: Config, task: TrainTask, d: Dist,
                 dtype: torch.dtype | None) -> None:
        super().__init__(loss, schedule)
        g = self.gan = cfg.gan
        self.kind, self.rank, self.seed = g.loss, d.rank, cfg.seed
        self.global_batch = cfg.train.batch_size
        # The discriminator's first weights depend on the seed alone, not on what was built before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            critic, self.critic_kwargs = task.discriminator(g.discriminator, g.loss)
        if g.pretrained:
            load_discriminator(critic, g.pretrained)
        self.critic = distributed_critic(critic.to(d.device), d, g.discriminator)
        critic_loss = CriticLoss(self.critic, g.loss, g.gp_weight, functools.partial(autocast, d.device, dtype))
        self.critic_step = wrap_ddp(critic_loss, d)
        self.optimizer = build_optimizer(cfg.train, self.critic, d.device, g.learning_rate)
        self.scheduler = schedule.build(self.optimizer)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=dtype is torch.float16)
        self.keys = (*loss.keys, *D_KEYS)
        self.bar = {"g": "loss/total", "adv": "loss/adversarial", "d": "loss/d_total"}
        self.best_by = best_rule(cfg)
        self.suspect = 0  # consecutive log points that look like a collapse
        self.sample_size = 0  # values in one HR sample (C*H*W): the scale of the WGAN critic's gap

    def _eps(self, step: int, k: int, hr: torch.Tensor) -> torch.Tensor:
        """The penalty's interpolation weights: drawn for the global batch from (seed, step, critic
        update), each rank taking its samples' share: exact resumes, and N ranks = one process."""
        share = hr.shape[0]
        draws = np.random.default_rng([self.seed % 2**63, step, k]).random(self.global_batch)
        return torch.from_numpy(draws[self.rank * share:(self.rank + 1) * share]).to(hr.device, hr.dtype)

    def _update_critic(self, step: int, hr: torch.Tensor, sr: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = []
        for k in range(self.gan.critic_steps):
            eps = self._eps(step, k, hr) if self.kind == "wgan-gp" else None
            losses = self.critic_step(hr, sr, eps)
            update(losses["loss/d_total"], self.optimizer, self.scaler, self.critic.parameters(), 0.0)
            rows.append(torch.stack([losses[key].detach() for key in D_KEYS]))
        return dict(zip(D_KEYS, torch.stack(rows).mean(0)))  # the mean over the step's critic updates

    def describe(self) -> str:
        g = self.gan
        return (f" as a GAN against {g.discriminator} ({count_parameters(self.critic) / 1e6:.3f}M parameters, "
                f"{g.loss}, {g.critic_steps} critic step(s) per step; best.pth by {self.best_by})")

    def rate_settings(self, cfg: Config) -> str:
        return f"{super().rate_settings(cfg)}, gan.learning_rate={self.gan.learning_rate:g}"

    def step(self, tr: StepContext, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        self.sample_size = hr[0].numel()
        with tr.section("forward"), autocast(tr.device, tr.dtype):
            sr = tr.model(lr)  # (b,3,h,w) -> (b,3,4h,4w), eager (through DDP under torchrun)
        sr = full_precision(sr)
        # NCHW for the discriminator: basicsr's VGG discriminator flattens its last map with view().
        real, fake = hr.contiguous(), sr.contiguous()
        with tr.section("discriminator"):
            d_losses = self._update_critic(tr.step, real, fake.detach())
        with tr.section("loss"):
            self.critic.requires_grad_(False)  # the generator's backward leaves the critic's gradients alone
            with autocast(tr.device, tr.dtype):
                fake_logits = full_precision(self.critic(fake))
                real_logits = None
                if self.kind == "relativistic":
                    with torch.no_grad():
                        real_logits = full_precision(self.critic(real))
            losses = self.loss(sr, hr, fake_logits, real_logits)
        try:
            update(losses["loss/total"], tr.optimizer, tr.scaler, tr.raw.parameters(), tr.train.grad_clip,
                   tr.section)
        finally:
            self.critic.requires_grad_(True)
        return {**losses, **d_losses}

    def schedulers(self) -> list[Scheduler]:
        return [self.scheduler] if self.scheduler is not None else []

    def parameters(self) -> list[torch.Tensor]:
        return list(self.critic.parameters())

    def model_checkpoint(self) -> dict[str, Any]:
        return {"objective": self.name, "discriminator": {"params": self.critic.state_dict(),
                                                          "arch": self.gan.discriminator, "kwargs": self.critic_kwargs}}

    def state_dict(self) -> dict[str, Any]:
        state = updates_state(self.optimizer, self.scheduler, self.scaler, "d_")
        return {**state, "gan_progress": {"suspect": self.suspect}}

    def load_state_dict(self, state: dict[str, Any], path: Any) -> None:
        saved = state.get("discriminator", {})
        if saved.get("arch") != self.gan.discriminator:
            raise CheckpointError(f"{path}: its discriminator is {saved.get('arch')}, but gan.discriminator="
                                  f"{self.gan.discriminator}; use another run name, or train.resume=never")
        try:
            self.critic.load_state_dict(saved["params"])
            load_updates(state, self.optimizer, self.scheduler, self.scaler, "d_")
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: does not fit this run's discriminator: {str(exc)[:300]}") from None
        self.suspect = int(state["gan_progress"]["suspect"])

    def diverged(self, values: dict[str, float], step: int) -> str | None:
        """Discriminator collapse: the discriminator wins outright for gan.collapse_points log points.

        vanilla / relativistic: D's loss <= gan.collapse_d_loss (it tells every sample apart) while
        G's adversarial loss >= gan.collapse_g_loss (D rates G's images as fake with near certainty).
        wgan-gp: the critic's loss has no floor, so the sign is its gap mean C(hr) - mean C(sr) per
        sqrt(values in a sample) >= gan.collapse_gap: a 1-Lipschitz critic (what the penalty enforces)
        on [0,1] pixels cannot exceed the RMS pixel difference, at most 1.
        """
        g = self.gan
        if self.kind == "wgan-gp":
            gap = -(values["loss/d_real"] + values["loss/d_fake"]) / math.sqrt(max(self.sample_size, 1))
            suspect = gap >= g.collapse_gap
            sign = f"the critic's gap per sqrt(pixel) stayed >= gan.collapse_gap={g.collapse_gap:g} (now {gap:.3g})"
        else:
            d_loss, g_loss = values["loss/d_total"], values["loss/adversarial"]
            suspect = d_loss <= g.collapse_d_loss and g_loss >= g.collapse_g_loss
            sign = (f"loss/d_total stayed <= gan.collapse_d_loss={g.collapse_d_loss:g} (now {d_loss:.3g}) with "
                    f"loss/adversarial >= gan.collapse_g_loss={g.collapse_g_loss:g} (now {g_loss:.3g})")
        self.suspect = self.suspect + 1 if suspect else 0
        if not g.collapse_points or self.suspect < g.collapse_points:
            return None
        return (f"discriminator collapse at step {step}: {sign} for {self.suspect} log points (gan.collapse_points); "
                f"lower gan.learning_rate or gan.weight, or raise gan.critic_steps only for wgan-gp")

    @property
    def healthy(self) -> bool:
        return self.suspect == 0


def _psnr(cfg: Config, task: TrainTask, d: Dist, dtype: torch.dtype | None, total_steps: int) -> Objective:
    return PixelObjective(build_generator_loss(cfg).to(d.device),
                          Schedule.of(cfg.train, task.batches.steps_per_epoch, total_steps), cfg.train.blowup,
                          cfg.train.blowup_points)


def _gan(cfg: Config, task: TrainTask, d: Dist, dtype: torch.dtype | None, total_steps: int) -> Objective:
    return GanObjective(build_generator_loss(cfg).to(d.device),
                        Schedule.of(cfg.train, task.batches.steps_per_epoch, total_steps), cfg, task, d, dtype)


OBJECTIVES: dict[str, Callable[[Config, TrainTask, Dist, torch.dtype | None, int], Objective]] = {
    "psnr": _psnr,
    "gan": _gan,
}


def objective_name(cfg: Config) -> str:
    """``gan`` when gan.discriminator names a discriminator, else ``psnr``."""
    return "gan" if cfg.gan.discriminator else "psnr"


def check_objective(cfg: Config) -> None:
    """Settings that cannot work with the configured objective, before anything is built."""
    if objective_name(cfg) != "gan":
        return
    if cfg.gan.weight <= 0:
        raise UserError(f"gan.discriminator={cfg.gan.discriminator} with gan.weight=0: the discriminator would not "
                        "train the generator; set gan.weight > 0 (ESRGAN 5e-3), or leave gan.discriminator empty")
    if cfg.train.compile not in ("auto", "off"):
        raise UserError(f"train.compile={cfg.train.compile} compiles PSNR runs only; GAN steps run eager: use "
                        "train.compile=off (or auto)")
    best_rule(cfg)


def build_objective(cfg: Config, task: TrainTask, d: Dist, dtype: torch.dtype | None, total_steps: int) -> Objective:
    """The task's own objective (``TrainTask.objective``, a builder of this signature), else that of ``cfg``
    from the table (after ``check_objective``)."""
    return (task.objective or OBJECTIVES[objective_name(cfg)])(cfg, task, d, dtype, total_steps)
