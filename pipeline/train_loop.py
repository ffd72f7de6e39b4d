"""The training loop of the train stage: steps, validation, checkpoints, stopping. Setup is in train.py.

One Trainer serves every objective (pipeline/objectives.py: what a step optimises) and every task
(pipeline/train_task.py: the data, the generator, the validation): the loop, checkpoints and
resume, EMA, validation and best.pth, logging, divergence checks, signals and DDP live here once.

Every rank runs the same loop. Decisions that depend on the clock or on a signal (time budget,
SIGTERM, the pace of a time-budgeted cosine schedule, train.compile=auto) are taken at log points,
where the ranks agree through one all-reduce, so they always stop (and compile) at the same step.
Only rank 0 writes files.

The step may run compiled (train.compile, pipeline/train_compile.py); EMA, validation and
checkpoints always use the eager module.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import train_io
from pipeline.checkpoint import CheckpointError, save_checkpoint
from pipeline.config import Config, to_dict
from pipeline.dataset import EpochBatches
from pipeline.errors import UserError
from pipeline.layout import RunLayout
from pipeline.objectives import Objective, load_updates, updates_state
from pipeline.runtime import compile_mode
from pipeline.train_compile import StepCompiler
from pipeline.train_profile import StepProfiler
from pipeline.validation import Validation, ValidationCadence

PROFILE_AFTER = 5  # steps of the session (after any compile warm-up) before train.profile_steps begins


class TrainingDiverged(UserError):
    """A loss became NaN or infinite, or the discriminator collapsed: the settings need changing."""


@dataclass
class Trainer:
    """The state of one training session and the loop over it (see train.main for the setup)."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype | None
    run: RunLayout  # models/<run>: where checkpoints, logs and plots go
    raw: nn.Module  # the model itself: EMA, validation and checkpoints use it
    model: nn.Module  # what the step calls: `raw`, or `raw` wrapped in DistributedDataParallel
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler | None
    scaler: torch.amp.GradScaler
    loader: DataLoader
    batches: EpochBatches
    validation: Validation  # the task's: metrics of a model on the held-out data, and of the baseline
    to_device: Callable[[torch.Tensor], torch.Tensor]  # the task's: a loader tensor -> float on the device
    objective: Objective  # what a step optimises, and its own state (a discriminator ...)
    total_steps: int  # 0 = no step limit
    arch: str
    kwargs: dict[str, Any]
    # Progress, saved in every checkpoint.
    step: int = 0
    best: train_io.BestCheckpoint = field(init=False)  # best.pth and the validation it holds
    bad_validations: int = 0
    val_step: int = -1
    train_seconds: float = 0.0  # of earlier sessions of this run
    # This session only.
    last_psnr: float = math.nan
    baseline: dict[str, float] = field(default_factory=dict)  # the validation's baseline metrics
    stop_signal: str = ""
    _saved_step: int = -1  # the step last.pth holds (this session's saves), for divergence messages
    _started: float = field(default_factory=time.perf_counter)
    _saved: float = field(default_factory=time.monotonic)
    _window: list[Any] = field(default_factory=list)
    _speed: tuple[float, int] = (0.0, 0)
    log: Any = None  # train_io.RunLog, opened by fit
    bar: Any = None  # tqdm progress bar, opened by fit
    compiler: StepCompiler = field(init=False)  # what the step calls: `model`, eager or compiled (use_compile)
    profiler: StepProfiler = field(init=False)  # train.profile_steps (off: its phases are no-ops)
    _session: tuple[float, int] = (0.0, 0)  # (clock, step) when this session's loop began
    _compile_pending: bool = False  # train.compile=auto waits for the first log point to decide
    _profile_from: int = -1  # the step at which the profiler starts; -1 = not yet known
    cadence: ValidationCadence = field(init=False)  # when to validate next

    def __post_init__(self) -> None:
        self.compiler = StepCompiler(self.model)
        self.schedulers = [s for s in (self.scheduler, *self.objective.schedulers()) if s is not None]
        self.best = train_io.BestCheckpoint(self.run.best, self.objective.best_by)
        t = self.cfg.train
        self.cadence = ValidationCadence(t.val_every, t.val_share, t.deterministic, self.device, self.world)
        self.profiler = StepProfiler(self.run.profile, t.profile_steps, self.device, self.main)

    @property
    def compiled(self) -> str:
        return self.compiler.mode

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, text: str) -> None:
        if self.main:
            tqdm.write(text)

    def elapsed(self) -> float:
        return self.train_seconds + time.perf_counter() - self._started

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """A named part of the step, for train.profile_steps (a no-op otherwise)."""
        return self.profiler.phase(name)

    # -- checkpoints ------------------------------------------------------------------------------

    def weights(self) -> dict[str, Any]:
        """What best.pth and history files hold: weights and how to rebuild the model."""
        state = {"params": self.raw.state_dict(), "arch": self.arch, "kwargs": self.kwargs, "step": self.step,
                 "epoch": self.step // self.batches.steps_per_epoch, "best_psnr": self.best.psnr,
                 "config": to_dict(self.cfg)}
        if self.ema is not None:
            state["params_ema"] = self.ema.module.state_dict()
        return {**state, **self.objective.weights()}

    def state_dict(self) -> dict[str, Any]:
        """last.pth: the weights plus everything an exact resume needs."""
        return {**self.weights(), **updates_state(self.optimizer, self.scheduler, self.scaler),
                "rng": train_io.rng_state(),
                "progress": {"bad_validations": self.bad_validations, "val_step": self.val_step,
                             "train_seconds": self.elapsed(), "best_score": self.best.score,
                             "best_step": self.best.step},
                **self.objective.state_dict()}

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        try:
            self.raw.load_state_dict(state["params"])
            if self.ema is not None:
                self.ema.module.load_state_dict(state.get("params_ema", state["params"]))
            load_updates(state, self.optimizer, self.scheduler, self.scaler)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: does not fit this run's model/optimizer: {str(exc)[:300]}") from None
        self.objective.load_state_dict(state, path)
        self.step, self.best.psnr = int(state["step"]), float(state["best_psnr"])
        progress = state["progress"]
        self.bad_validations, self.val_step = progress["bad_validations"], progress["val_step"]
        self.train_seconds = progress["train_seconds"]
        self.best.score = float(progress.get("best_score", self.best.psnr))  # (runs saved before best_score)
        self.best.step = int(progress.get("best_step", -1))
        self._saved_step = self.step
        if self.world == 1:
            train_io.set_rng_state(state["rng"])
        else:  # one saved stream cannot continue every rank's: give each a fresh one
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.step + self.rank)

    def save(self, history: bool) -> None:
        if not self.main:
            return
        self._check_finite()
        save_checkpoint(self.run.last, self.state_dict())
        keep = self.cfg.train.keep_last
        if history and keep > 0:
            save_checkpoint(self.run.history_path(self.step), self.weights())
            train_io.prune_history(self.run, keep)
        self._saved = time.monotonic()
        self._saved_step = self.step

    def _check_finite(self) -> None:
        """last.pth is never overwritten with broken weights: the losses since the last log point and
        every trained tensor must be finite (one device sync per save)."""
        checks = [p.detach().isfinite().all() for p in (*self.raw.parameters(), *self.objective.parameters())]
        checks += [torch.stack(self._window).isfinite().all()] if self._window else []
        if not bool(torch.stack(checks).all()):
            self._diverged(f"weights or losses became NaN or infinite by step {self.step}")

    def _diverged(self, what: str) -> None:
        t, rates = self.cfg.train, self.objective.rate_settings(self.cfg)
        kept = (f"{self.run.last} holds the last good state (step {self._saved_step})" if self._saved_step >= 0
                else "nothing was saved")
        raise TrainingDiverged(f"{what} ({rates}, precision {t.precision}: lower the learning rate or set "
                               f"train.grad_clip); {kept}")

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train until a limit, the time budget, early stopping or a signal; then validate and save."""
        self.baseline = self.validation.baseline()
        name = self.validation.baseline_name
        self.say(f"{name} validation PSNR {self.baseline['psnr']:.3f} dB on {self.validation.size} images")
        self.log = train_io.RunLog(self.run, self.step, self.main)
        self.bar = tqdm(total=self.total_steps or None, initial=self.step, disable=not self.main, unit="step",
                        dynamic_ncols=True)
        # Python lets only the main thread set handlers; elsewhere (a notebook's worker) Ctrl-C is plain.
        signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
        handlers = {s: signal.signal(s, self._on_signal) for s in signals}
        try:
            self.raw.train()
            self._session = self._speed = (time.perf_counter(), self.step)
            self.cadence.start(self.step)
            self._start_compile()
            reason = self._stop_reason()
            spe = self.batches.steps_per_epoch
            self.batches.set_position(self.step // spe, self.step % spe)
            # One iterator for the whole session: its workers start once and run on across epochs
            # (the loader's sampler chains them, train.RunBatches), prefetching over epoch ends.
            batches = iter(self.loader)
            try:
                while reason is None:
                    with self.profiler.phase("data"):
                        lr_u8, hr_u8 = next(batches)
                    self._train_step(lr_u8, hr_u8)
                    with self.profiler.phase("after_step"):
                        reason = self._after_step()
                    self.profiler.step()
            finally:
                del batches  # shuts the loader workers down now (also on an error), not at interpreter exit
                self.profiler.stop()
            if self.profiler.summary:
                self.say(f"profile of {self.cfg.train.profile_steps} steps in {self.profiler.out}:\n"
                         f"{self.profiler.summary}")
            if reason != "signal" and self.val_step != self.step:
                self._validate()  # a signal leaves little time (a scheduler's grace period): save only
            self.save(history=reason != "signal")
            self.log.plot(force=True)
        finally:
            self.bar.close()
            self.log.close()
            for s, handler in handlers.items():
                signal.signal(s, handler)
        self.say(f"stopped at step {self.step} ({self.stop_signal or reason}); {self._best_text()}; "
                 f"checkpoints in {self.run.dir}")

    def _best_text(self) -> str:
        if self.val_step < 0:
            return "not validated yet"
        base, best = self.baseline["psnr"], self.best
        psnr = f"PSNR {best.psnr:.3f} dB ({self.validation.baseline_name} {base:.3f}, {best.psnr - base:+.3f} dB)"
        if best.rule == "psnr":
            return f"best validation {psnr}"
        return f"best.pth: step {best.step} by {best.rule} ({psnr})"

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signal.Signals(signum).name
        # A second Ctrl-C interrupts at once instead of waiting for the step to end.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _train_step(self, lr_batch: torch.Tensor, hr_batch: torch.Tensor) -> None:
        with self.phase("to_device"):
            lr, hr = self.to_device(lr_batch), self.to_device(hr_batch)
        for scheduler in self.schedulers:
            scheduler.step_update(self.step)  # the learning rate of update number `step`
        losses = self.objective.step(self, lr, hr)
        self.step += 1
        if self.ema is not None:
            with self.phase("ema"):
                self.ema.update(self.raw, step=self.step)
        self._window.append(torch.stack([losses[key].detach() for key in self.objective.keys]))
        self.bar.update(1)
        warmup = self.compiler.warmed_up(self.step, self.device)
        if warmup is not None:
            self.log.write(self.step, "compile", {"compile/warmup_seconds": warmup[0]})
            self.say(f"step {self.step}: compiled step (mode={self.compiled}) warmed up in {warmup[0]:.1f} s "
                     f"over {warmup[1]} steps")
            self._speed = (time.perf_counter(), self.step)  # samples/s counts the compiled steps only

    # -- compilation ------------------------------------------------------------------------------

    def use_compile(self, mode: str) -> None:
        """From the next step on, call ``model`` through torch.compile(mode) ('off' = eager) for the
        fixed batch shape; the warm-up is timed and logged (kind `compile`)."""
        if self.compiler.use(mode, self.step):
            self.say(f"step {self.step}: compiling the training step (torch.compile mode={mode})")

    def _start_compile(self) -> None:
        """Explicit modes (and `auto` off CUDA, where it is always off) decide now; `auto` on CUDA
        decides at the first log point, from the time left at the pace measured so far."""
        setting = self.cfg.train.compile if self.objective.compiles else "off"
        self._compile_pending = setting == "auto" and self.device.type == "cuda"
        if not self._compile_pending:
            self.use_compile(compile_mode(setting, self.device, math.inf))
        self._profile_from = -1 if self._compile_pending else self._steady_step()

    def _steady_step(self) -> int:
        """The first step the profiler may record: after the compile warm-up and a few more steps."""
        return self.compiler.steady_from(self.step) + PROFILE_AFTER

    def _seconds_left(self) -> float:
        """Training time still ahead: the time budget's rest, or the steps left at this session's pace."""
        t = self.cfg.train
        left = [math.inf]
        if t.max_minutes > 0:
            left.append(t.max_minutes * 60 - self.elapsed())
        if self.total_steps:
            start, start_step = self._session
            pace = (time.perf_counter() - start) / max(self.step - start_step, 1)
            left.append((self.total_steps - self.step) * pace)
        return min(left)

    def _after_step(self) -> str | None:
        t = self.cfg.train
        if self.step % t.log_every == 0:
            self._log_train()
        if self.step >= self.cadence.next:
            seconds = self._validate()
            if self.cadence.plan(seconds, self.step):
                self.say(f"step {self.step}: a validation takes {seconds:.1f} s; validating every "
                         f"{self.cadence.every} steps keeps it under train.val_share={t.val_share:g} of the time")
        # While the objective suspects a divergence, periodic saves wait: last.pth stays from before it.
        if self.step % t.save_every == 0 and self.objective.healthy:
            self.save(history=True)
        elif t.save_minutes > 0 and time.monotonic() - self._saved >= t.save_minutes * 60 and self.objective.healthy:
            self.save(history=False)
        if self.step == self._profile_from:
            self.profiler.start()
        return self._stop_reason()

    def _log_train(self) -> None:
        # One sync per log point: the losses stay on the device between them.
        sums = torch.stack(self._window).sum(0)
        sums = torch.cat([sums, sums.new_tensor([len(self._window)])])  # (the objective's losses..., steps)
        if self.world > 1:
            dist.all_reduce(sums)
        losses = dict(zip(self.objective.keys, (sums[:-1] / sums[-1]).tolist()))
        self._window.clear()
        start, start_step = self._speed
        now = time.perf_counter()
        samples = (self.step - start_step) * self.cfg.train.batch_size / max(now - start, 1e-9)
        values = {**losses, "samples_per_s": samples, "learning_rate": self.optimizer.param_groups[0]["lr"],
                  "time_s": self.elapsed()}  # training clock of the run (validations included)
        self._speed = (now, self.step)
        self.log.write(self.step, "train", values)  # also the values that stop the run below, for the record
        shown = {label: f"{values[key]:.4f}" for label, key in self.objective.bar.items() if key in values}
        self.bar.set_postfix(**shown, psnr=f"{self.last_psnr:.2f}", samples_s=f"{values['samples_per_s']:.1f}",
                             refresh=False)
        # Every rank sees the same (all-reduced) losses, so all of them stop together.
        broken = [key for key, value in losses.items() if not math.isfinite(value)]
        if broken:
            self._diverged(f"{broken[0]} is {losses[broken[0]]} at step {self.step}")
        collapse = self.objective.diverged(losses, self.step)
        if collapse:
            kept = f"step {self._saved_step}" if self._saved_step >= 0 else "nothing saved"
            raise TrainingDiverged(f"{collapse}; {self.run.last}: {kept}; best.pth and history/ keep earlier weights")

    def _validate(self) -> float:
        """Validate (EMA weights when enabled), keep best.pth, log; returns the validation's seconds."""
        start = time.perf_counter()
        self.raw.eval()
        model = self.ema.module if self.ema is not None else self.raw  # the weights inference will use
        metrics = self.validation(model, self.dtype)
        self.raw.train()
        seconds = time.perf_counter() - start
        psnr = metrics["psnr"]
        self.last_psnr, self.val_step = psnr, self.step
        improved = self.best.offer(metrics, self.step, self.weights, write=self.main)
        self.bad_validations = 0 if improved else self.bad_validations + 1
        base, best = self.validation.baseline_name, self.best
        self.log.write(self.step, "val", {
            "val/psnr": psnr, "val/best_psnr": best.psnr, f"val/{base}_psnr": self.baseline["psnr"],
            **{f"val/{k}": v for k, v in metrics.items() if k != "psnr"},
            **{f"val/{base}_{k}": v for k, v in self.baseline.items() if k != "psnr"}, "val/seconds": seconds})
        self.log.plot()
        lpips = f", LPIPS {metrics['lpips']:.4f}" if "lpips" in metrics else ""
        kept = f"best {best.psnr:.3f}" if best.rule == "psnr" else f"best.pth: step {best.step} by {best.rule}"
        self.say(f"step {self.step}: validation PSNR {psnr:.3f} dB{lpips} ({kept}, {base} {self.baseline['psnr']:.3f})")
        self._speed = (time.perf_counter(), self.step)  # samples/s counts training time only
        return seconds

    def _stop_reason(self) -> str | None:
        t = self.cfg.train
        if self.total_steps and self.step >= self.total_steps:
            return "step limit"
        if t.patience and self.bad_validations >= t.patience:
            return f"no improvement in {t.patience} validations"
        if self.world > 1 and self.step % t.log_every:
            return None  # clock and signal decisions wait for the next point where ranks agree
        decide = self._compile_pending and self.step % t.log_every == 0 and self.step > self._session[1]
        flags = [float(bool(self.stop_signal)), float(t.max_minutes > 0 and self.elapsed() >= t.max_minutes * 60),
                 self._pace(), float(decide and self.main and compile_mode("auto", self.device,
                                                                           self._seconds_left()) != "off")]
        if self.world > 1:
            shared = torch.tensor(flags, dtype=torch.float64, device=self.device)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)  # any rank's signal stops all; rank 0's pace rules
            flags = shared.tolist()
        if flags[2] > 0:
            for scheduler in self.schedulers:
                scheduler.t_initial = int(flags[2])  # type: ignore[attr-defined]
        if decide:  # every rank reaches this step together, and follows rank 0's vote
            self._compile_pending = False
            self.use_compile("reduce-overhead" if flags[3] else "off")
            self._profile_from = self._steady_step()
        if flags[0]:
            return "signal"
        if flags[1]:
            return "time budget"
        return None

    def _pace(self) -> float:
        """Cosine length for a time budget without a step limit: the steps the budget allows at the
        pace so far (validations included). 0 = keep the current length."""
        t = self.cfg.train
        if not (self.main and t.scheduler == "cosine" and not self.total_steps and t.max_minutes > 0):
            return 0.0
        if self.step == 0 or self.step % t.log_every:
            return 0.0
        return float(max(self.step + 1, t.warmup_steps + 1, round(self.step * t.max_minutes * 60 / self.elapsed())))

