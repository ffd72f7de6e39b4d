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

from pipeline.core.config import Config, PhaseConfig
from pipeline.core.errors import UserError

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
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise UserError(f"train.phases: two phases are named {next(n for n in names if names.count(n) > 1)!r}")
    return phases


def phased(cfg: Config) -> bool:
    return bool(cfg.train.phases)
