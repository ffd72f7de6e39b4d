"""``train.phases``: the stretches of one run, each with a few train settings of its own.

A run without ``train.phases`` is one phase whose settings are ``train.*`` and whose length is the
run's limits. With phases, phase ``k`` runs ``train.*`` overridden by ``train.phases[k]`` (learning
rate and schedule over the phase's own steps, loss mix, crop, batch, clipping) for its ``steps`` or
``minutes``; the run ends after the last phase, or earlier at ``train.max_steps``,
``train.max_minutes``, ``train.patience`` or a signal. ``last.pth`` records the phase and where it
began, so a run killed in phase 2 resumes in phase 2 at the exact sample and learning rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.core.config import Config, PhaseConfig
from pipeline.core.errors import UserError
from pipeline.training.updates import GeneratorUpdates, LearningRates, Schedule

if TYPE_CHECKING:
    from pipeline.training.objectives import Objective
    from pipeline.training.task import TrainTask

_NOT_SETTINGS = ("name", "steps", "minutes")  # a phase's fields that are not train.* settings


@dataclass(frozen=True)
class Phase:
    """One phase: its place, its name, the run's config as it stands during it, and its length."""

    index: int
    name: str
    cfg: Config  # train.* with the phase's settings (train.phases kept, so checkpoints say how the run was made)
    steps: int = 0  # 0 = not limited by steps
    minutes: float = 0.0  # 0 = not limited by time

    @property
    def timed(self) -> bool:
        return self.minutes > 0


def settings_of(entry: PhaseConfig) -> dict[str, object]:
    """What a phase sets: its length and the train.* settings it changes (the unset ones left out)."""
    return {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)
            if f.name != "name" and getattr(entry, f.name) is not None}


def _phase(cfg: Config, index: int, entry: PhaseConfig) -> Phase:
    changes = {k: v for k, v in settings_of(entry).items() if k not in _NOT_SETTINGS}
    phase_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
    return Phase(index, entry.name or f"phase{index + 1}", phase_cfg, entry.steps or 0, entry.minutes or 0.0)


def plan(cfg: Config) -> list[Phase]:
    """The run's phases in order (one phase of ``train.*`` without ``train.phases``)."""
    entries = cfg.train.phases
    if not entries:
        return [Phase(0, "", cfg)]
    phases = [_phase(cfg, i, entry) for i, entry in enumerate(entries)]
    for phase in phases[:-1]:
        if not (phase.steps or phase.minutes):
            raise UserError(f"train.phases[{phase.index}] ({phase.name}) needs steps or minutes: only the last "
                            "phase may run until the run's own limits")
    for phase in phases:
        if not phase.name.isprintable() or not phase.name.strip():
            raise UserError(f"train.phases[{phase.index}].name={phase.name[:40]!r}: a phase name is one line of "
                            "printable text (it labels log.jsonl, the start line and curves.png)")
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise UserError(f"train.phases: two phases are named {next(n for n in names if names.count(n) > 1)!r}")
    return phases


class PhaseTracker:
    """Where a run stands among its phases: the phase in force, where it began (step, training seconds),
    its loader and order, and the learning rates of every optimizer (the generator's counted from that step)."""

    def __init__(self, cfg: Config, task: TrainTask, updates: GeneratorUpdates, objective: Objective) -> None:
        self.all = plan(cfg)
        self.current = self.all[0]
        self.start = (0, 0.0)
        self.task, self.updates, self.objective = task, updates, objective
        self.loader, self.batches = task.loader, task.batches  # the task built the first phase's
        self.rates = LearningRates(objective.schedule, [updates.scheduler, *objective.schedulers()])

    @property
    def many(self) -> bool:
        return len(self.all) > 1

    @property
    def last(self) -> bool:
        return self.current.index == len(self.all) - 1

    def enter(self, index: int, start: tuple[int, float], device: torch.device) -> str:
        """Phase ``index`` begins at ``start``: its loader, its loss mix, its learning rate with a schedule
        counted from that step. Returns the line that says so."""
        phase = self.current = self.all[index]
        self.start = start
        assert self.task.loader_for is not None  # (run checks that a phased run's task has one)
        self.loader, self.batches = self.task.loader_for(phase.cfg, index)
        t, u = phase.cfg.train, self.updates
        for group in u.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = t.learning_rate  # the phase's peak; its scheduler starts from it
        schedule = Schedule.of(t, self.batches.steps_per_epoch, phase.steps)
        u.scheduler = schedule.build(u.optimizer)
        self.rates = LearningRates(schedule, [u.scheduler])
        self.objective.enter_phase(phase.cfg, device)
        entry = phase.cfg.train.phases[index]
        return f"step {start[0]}: phase {index + 1}/{len(self.all)} ({phase.name}): " + ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings_of(entry).items())

    def steps_in(self, step: int) -> int:
        """Steps of the current phase done at ``step``."""
        return step - self.start[0]

    def out_of_steps(self, step: int) -> bool:
        phase = self.current
        return bool(phase.steps and self.steps_in(step) >= phase.steps)

    def out_of_minutes(self, elapsed: float) -> bool:
        """(Decided at log points, where the ranks agree.)"""
        phase = self.current
        return phase.timed and elapsed - self.start[1] >= phase.minutes * 60

    def planned_steps(self, total_steps: int) -> int:
        """Steps the run will take when known in advance (progress bar): the step limit, or the phases'."""
        lengths = [p.steps for p in self.all]
        if self.many and all(lengths) and not any(p.timed for p in self.all):
            return min(sum(lengths), total_steps) if total_steps else sum(lengths)
        return total_steps

    def budget_seconds(self, max_minutes: float, total_steps: int) -> float:
        """The time a cosine must fit when no step count fixes its length (a timed phase, or a one-phase run
        with only train.max_minutes), counted from the phase's start; 0 = its length is fixed."""
        phase = self.current
        if phase.timed and not phase.steps:
            return phase.minutes * 60
        if not self.many and not total_steps and max_minutes > 0:
            return max_minutes * 60
        return 0.0

    def state(self) -> dict[str, Any]:
        """What last.pth records of the phases."""
        return {"index": self.current.index, "start_step": self.start[0], "start_seconds": self.start[1]}

    def restore(self, saved: dict[str, Any] | None, device: torch.device) -> None:
        """Back in the phase ``saved`` records (a run saved before phases existed: the first)."""
        saved = saved or {"index": 0, "start_step": 0, "start_seconds": 0.0}
        index, start = int(saved["index"]), (int(saved["start_step"]), float(saved["start_seconds"]))
        if not 0 <= index < len(self.all):
            raise ValueError(f"it was saved in phase {index + 1}, and train.phases has {len(self.all)}")
        if index > 0:
            self.enter(index, start, device)  # the phase's loader and scheduler, for the saved state to fill
        self.start = start
