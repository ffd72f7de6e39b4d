"""How weights change: optimizers, learning-rate schedules, one update, and their saved state.

Every learning rate of a run comes from one mechanism: a timm scheduler per optimizer, stepped by
the loop before each update with that update's number (``LearningRates.set``), built from a
``Schedule``. A run's schedule is ``train.*``'s (``Schedule.of``) unless its objective brings its
own (SRResCycGAN's halving, ``pipeline.mri.cycle``); a time-budgeted cosine without a step limit
is re-timed at log points (``LearningRates.retime``) so that its decay ends with the budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn

from pipeline.core.config import TrainConfig
from pipeline.core.runtime import optimizer_flags

Phase = Callable[[str], contextlib.AbstractContextManager]
UNLIMITED = 10**9  # the length of a cosine that nothing limits: it stays at its peak rate


def _no_phase(_name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


SCHEDULE_FREE = "adamw-schedulefree"


def build_optimizer(t: TrainConfig, model: nn.Module, device: torch.device,
                    learning_rate: float | None = None) -> torch.optim.Optimizer:
    """Adam / AdamW with this device's update kernel (runtime.optimizer_flags: fused on CUDA), or
    schedule-free AdamW (its own warm-up of train.warmup_steps; no fused kernel, a foreach one)."""
    rate = t.learning_rate if learning_rate is None else learning_rate
    if t.optimizer == SCHEDULE_FREE:
        import schedulefree

        return schedulefree.AdamWScheduleFree(model.parameters(), lr=rate, weight_decay=t.weight_decay,
                                              warmup_steps=t.warmup_steps, foreach=True)
    optimizer_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[t.optimizer]
    return optimizer_cls(model.parameters(), lr=rate, weight_decay=t.weight_decay, betas=(0.9, t.adam_beta2),
                         **optimizer_flags(device))


def schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers keep two weight sequences: ``train()`` puts the one the gradient is taken
    at into the model, ``eval()`` the average that validation, checkpoints and inference use."""
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule in optimizer updates (timm, stepped per update so a resume mid-epoch is exact).

    ``cosine``: linear warm-up from ``floor`` over ``warmup`` updates, then a cosine down to ``floor``
    at ``length`` (0 = nothing limits the run: it stays at the peak rate); ``step``: multiplied by
    ``gamma`` every ``period`` updates; ``constant``: no scheduler.
    """

    kind: str
    warmup: int = 0
    floor: float = 0.0
    length: int = 0
    period: int = 1
    gamma: float = 0.5

    @classmethod
    def of(cls, t: TrainConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
        """``train.*``'s schedule: ``train.scheduler`` (step: halved every ``train.step_epochs`` epochs);
        none for schedule-free AdamW, which needs none (its warm-up is its own)."""
        if t.optimizer == SCHEDULE_FREE:
            return cls("constant")
        # The floor never exceeds the peak: learning_rate 0 (a phase that only validates or steadies EMA) is 0,
        # and a peak below train.min_learning_rate stays at that peak rather than climbing to the floor.
        return cls(t.scheduler, t.warmup_steps, min(t.min_learning_rate, t.learning_rate), total_steps,
                   t.step_epochs * steps_per_epoch, t.step_gamma)

    def build(self, optimizer: torch.optim.Optimizer) -> Scheduler | None:
        if self.kind == "step":
            return StepLRScheduler(optimizer, decay_t=self.period, decay_rate=self.gamma, t_in_epochs=False)
        if self.kind == "cosine":
            length = max(self.length or UNLIMITED, self.warmup + 1)
            return CosineLRScheduler(optimizer, t_initial=length, lr_min=self.floor, warmup_t=self.warmup,
                                     warmup_lr_init=self.floor, t_in_epochs=False)
        return None


class LearningRates:
    """The schedulers of a run's optimizers (the generator's first), set together from the update number."""

    def __init__(self, schedule: Schedule, schedulers: Iterable[Scheduler | None]) -> None:
        self.schedule = schedule
        self.schedulers = [s for s in schedulers if s is not None]

    def set(self, step: int) -> None:
        """The learning rates of update number ``step`` (0 = the first)."""
        for scheduler in self.schedulers:
            scheduler.step_update(step)

    def retime(self, length: int) -> None:
        """A cosine's new length (updates): the loop's estimate of what a time budget allows."""
        for scheduler in self.schedulers:
            if isinstance(scheduler, CosineLRScheduler):
                scheduler.t_initial = length


@dataclass
class GeneratorUpdates:
    """How the generator's weights change: its optimizer, scheduler and gradient scaler, and their EMA."""

    optimizer: torch.optim.Optimizer
    scheduler: Scheduler | None
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None

    @classmethod
    def build(cls, t: TrainConfig, model: nn.Module, device: torch.device, dtype: torch.dtype | None,
              schedule: Schedule) -> GeneratorUpdates:
        optimizer = build_optimizer(t, model, device)
        # train.ema_warmup: the decay warms up (1 - (1+step)^-2/3, capped at train.ema_decay) so short runs from
        # scratch get a useful average; without it a fine-tune's average starts at the loaded weights.
        ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=t.ema_warmup) if t.ema_decay > 0 else None
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)  # bf16 needs no scaling
        return cls(optimizer, schedule.build(optimizer), scaler, ema)

    def training(self) -> None:
        """The weights the gradient is taken at in the model (a no-op but for schedule-free optimizers)."""
        if schedule_free(self.optimizer):
            self.optimizer.train()  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Within: the weights to validate and save in the model (schedule-free: the average), then back."""
        if not schedule_free(self.optimizer):
            yield
            return
        self.optimizer.eval()  # type: ignore[attr-defined]
        try:
            yield
        finally:
            self.optimizer.train()  # type: ignore[attr-defined]


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Saved param groups replace the current ones, flags included: keep this device's fused /
    foreach choice (a run may resume on another device), which also places Adam's step counts."""
    flags = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
    optimizer.load_state_dict({**saved, "param_groups": [{**g, **flags} for g in saved["param_groups"]]})


def updates_state(optimizer: torch.optim.Optimizer, scheduler: Scheduler | None, scaler: torch.amp.GradScaler,
                  prefix: str = "") -> dict[str, Any]:
    """The states of an optimizer, its scheduler and its gradient scaler, as last.pth keeps them."""
    return {f"{prefix}optimizer": optimizer.state_dict(), f"{prefix}scheduler": scheduler.state_dict() if scheduler
            else {}, f"{prefix}scaler": scaler.state_dict()}


def load_updates(state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Scheduler | None,
                 scaler: torch.amp.GradScaler, prefix: str = "") -> None:
    """Inverse of ``updates_state`` (KeyError / ValueError when ``state`` does not fit)."""
    load_optimizer(optimizer, state[f"{prefix}optimizer"])
    if scheduler is not None and state[f"{prefix}scheduler"]:
        scheduler.load_state_dict(state[f"{prefix}scheduler"])
    if state[f"{prefix}scaler"]:
        scaler.load_state_dict(state[f"{prefix}scaler"])


def update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
           parameters: Iterable[nn.Parameter], grad_clip: float, phase: Phase = _no_phase) -> None:
    """One optimizer update from ``loss``: scaled backward, optional clipping of the true gradient, step."""
    with phase("backward"):
        scaler.scale(loss).backward()
    if grad_clip > 0:
        with phase("clip"):
            scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
            nn.utils.clip_grad_norm_(parameters, grad_clip)
    with phase("optimizer"):
        scaler.step(optimizer)
        scaler.update()
        # Gradients die with the step that made them: CUDA graphs reuse their memory next step.
        optimizer.zero_grad(set_to_none=True)
