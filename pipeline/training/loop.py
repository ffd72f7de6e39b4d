"""The training loop: steps, validation, checkpoints, stopping. The setup is ``pipeline.training.run``.

One ``Trainer`` serves every task (``pipeline.training.task``: the data, the generator, the
validation) and every objective (``pipeline.training.objectives``: what a step optimises): the
loop, checkpoints and resume, EMA, validation and best.pth, logging, divergence checks, signals
and DDP live here once.

A run is one or more phases (``pipeline.training.phases``): each brings its settings (``train``),
its loader and its learning-rate schedule, counted from the step it began; ``last.pth`` records
the phase. A generator that starts from trained weights (``TrainTask.pretrained``) is validated
before the first step, and those weights compete for best.pth like any validation.

Every rank runs the same loop. Decisions that depend on the clock or on a signal (time budget,
SIGTERM, the length of a time-budgeted cosine, train.compile=auto) are ``Votes`` taken at log
points, where the ranks agree through one all-reduce, so they always stop (and compile) at the
same step. Only rank 0 writes files.

The step may run compiled (train.compile, ``pipeline.training.compile``); EMA, validation and
checkpoints always use the eager module.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pipeline.core.config import Config, to_dict
from pipeline.core.distributed import Dist, wrap_ddp
from pipeline.core.errors import CheckpointError, UserError
from pipeline.core.layout import RunLayout
from pipeline.core.runtime import compile_mode
from pipeline.models.checkpoint import save_checkpoint
from pipeline.training import phases, run_folder
from pipeline.training.augment import BatchAugment
from pipeline.training.compile import StepCompiler
from pipeline.training.objectives import Objective
from pipeline.training.profile import StepProfiler
from pipeline.training.task import TrainTask
from pipeline.training.updates import GeneratorUpdates, load_updates, updates_state
from pipeline.training.validation import ValidationCadence
from pipeline.training.votes import Votes

PROFILE_AFTER = 5  # steps of the session (after any compile warm-up) before train.profile_steps begins
PHASE_END = "phase end"  # the stop reason that moves a run with train.phases on to its next phase


class TrainingDiverged(UserError):
    """A loss became NaN or infinite, or the discriminator collapsed: the settings need changing."""


@dataclass
class Trainer:
    """One training session of a run: the loop over ``task``'s batches with ``objective``'s steps."""

    cfg: Config
    d: Dist
    run: RunLayout  # models/<run>: where checkpoints, logs and plots go
    task: TrainTask
    objective: Objective
    updates: GeneratorUpdates  # the generator's optimizer, scheduler, gradient scaler and EMA
    dtype: torch.dtype | None  # the autocast dtype of steps and validations (None = fp32)
    total_steps: int  # 0 = no step limit
    best_floor: float = -math.inf  # score of the best.pth an earlier start left on disk: never replaced by worse
    # Progress, saved in every checkpoint.
    step: int = 0
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
    _session: tuple[float, int] = (0.0, 0)  # (clock, step) when this session's loop began
    _compile_pending: bool = False  # train.compile=auto waits for the first log point to decide
    _profile_from: int = -1  # the step at which the profiler starts; -1 = not yet known
    start_psnr: float = math.nan  # validation PSNR of the weights the run started from (TrainTask.pretrained)

    def __post_init__(self) -> None:
        self.raw: nn.Module = self.task.generator  # EMA, validation and checkpoints use the model itself
        self.model: nn.Module = wrap_ddp(self.raw, self.d)  # what the step calls (DDP under torchrun)
        self.compiler = StepCompiler(self.model)  # `model`, eager or compiled (use_compile)
        self.phases = phases.PhaseTracker(self.cfg, self.task, self.updates, self.objective)
        self.best = run_folder.BestCheckpoint(self.run.best, self.objective.best_by, floor=self.best_floor)
        t = self.cfg.train
        self.cadence = ValidationCadence(t.val_every, t.val_share, t.deterministic, self.device, self.world)
        self.profiler = StepProfiler(self.run.profile, t.profile_steps, self.device, self.main)
        self.log = run_folder.RunLog(self.run, 0, enabled=False)  # fit opens the run's log
        self.bar = tqdm(disable=True)  # fit opens the progress bar
        self.augment = BatchAugment(self.cfg.train.batch_aug, self.cfg.train.batch_aug_prob, self.cfg.seed)

    # What a step reads (objectives.StepContext).
    device = property(lambda self: self.d.device)
    rank = property(lambda self: self.d.rank)
    world = property(lambda self: self.d.world)
    main = property(lambda self: self.d.main)
    train = property(lambda self: self.phases.current.cfg.train)  # the train settings in force (the phase's)
    optimizer = property(lambda self: self.updates.optimizer)
    scaler = property(lambda self: self.updates.scaler)
    ema = property(lambda self: self.updates.ema)
    compiled = property(lambda self: self.compiler.mode)

    def say(self, text: str) -> None:
        if self.main:
            tqdm.write(text)

    def elapsed(self) -> float:
        return self.train_seconds + time.perf_counter() - self._started

    def section(self, name: str) -> contextlib.AbstractContextManager:
        """A named section of the step, for train.profile_steps (a no-op otherwise)."""
        return self.profiler.section(name)

    # -- checkpoints ------------------------------------------------------------------------------

    def model_checkpoint(self) -> dict[str, Any]:
        """What best.pth and history files hold: weights and how to rebuild the model."""
        state = {"params": self.raw.state_dict(), "arch": self.task.arch, "kwargs": self.task.kwargs,
                 "step": self.step, "epoch": self.step // self.phases.batches.steps_per_epoch,
                 "best_psnr": self.best.psnr, "config": to_dict(self.cfg)}
        if self.ema is not None:
            state["params_ema"] = self.ema.module.state_dict()
        return {**state, **self.objective.model_checkpoint()}

    def state_dict(self) -> dict[str, Any]:
        """last.pth: the weights plus everything an exact resume needs."""
        u = self.updates
        return {**self.model_checkpoint(), **updates_state(u.optimizer, u.scheduler, u.scaler),
                "rng": run_folder.rng_state(),
                "progress": {"bad_validations": self.bad_validations, "val_step": self.val_step,
                             "train_seconds": self.elapsed(), "best_score": self.best.score,
                             "best_step": self.best.step, "start_psnr": self.start_psnr,
                             "phase": self.phases.state()},
                **self.objective.state_dict()}

    def load_state(self, state: dict[str, Any], path: Any) -> None:
        u = self.updates
        try:
            self.phases.restore(state["progress"].get("phase"), self.device)
            self.raw.load_state_dict(state["params"])
            if self.ema is not None:
                self.ema.module.load_state_dict(state.get("params_ema", state["params"]))
            load_updates(state, u.optimizer, u.scheduler, u.scaler)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: does not fit this run's model/optimizer: {str(exc)[:300]}") from None
        self.objective.load_state_dict(state, path)
        self.step, self.best.psnr = int(state["step"]), float(state["best_psnr"])
        progress = state["progress"]
        self.bad_validations, self.val_step = progress["bad_validations"], progress["val_step"]
        self.train_seconds = progress["train_seconds"]
        self.best.score = float(progress.get("best_score", self.best.psnr))  # (runs saved before best_score)
        self.best.step = int(progress.get("best_step", -1))
        self.start_psnr = float(progress.get("start_psnr", math.nan))
        self._saved_step = self.step
        if self.world == 1:
            run_folder.set_rng_state(state["rng"])
        else:  # one saved stream cannot continue every rank's: give each a fresh one
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.step + self.rank)

    def save(self, history: bool) -> None:
        # Every rank switches to the weights inference will use (schedule-free: the average) and back, so
        # the ranks' weights stay identical; rank 0 writes.
        with self.updates.evaluating():
            if not self.main:
                return
            self._check_finite()
            save_checkpoint(self.run.last, self.state_dict())
            keep = self.cfg.train.keep_last
            if history and keep > 0:
                save_checkpoint(self.run.history_path(self.step), self.model_checkpoint())
                run_folder.prune_history(self.run, keep)
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
        phase = self.phases.current  # the phase's learning rate, not the run's
        rates = self.objective.rate_settings(phase.cfg)
        if self.phases.many:
            if phase.cfg.train.phases[phase.index].learning_rate is not None:
                rates = rates.replace("train.learning_rate=", f"train.phases[{phase.index}].learning_rate=")
            rates = f"phase {phase.index + 1} ({phase.name}), {rates}"
        raise TrainingDiverged(f"{what} ({rates}, precision {self.cfg.train.precision}: lower the learning rate or "
                               f"set train.grad_clip); {self._kept()}")

    def _kept(self) -> str:
        """What the run folder keeps when a run stops as diverged."""
        kept = [f"{self.run.last} holds the last good state (step {self._saved_step})"] if self._saved_step >= 0 else []
        if self.run.best.is_file():
            kept.append(f"{self.run.best} the best validated weights")
        return "; ".join(kept) or "nothing was saved"

    def _broken_start(self, what: str) -> None:
        """NaN / Inf from the weights the run starts from, before any update: the weights, not the learning rate."""
        source = (f"the weights in model.pretrained={self.cfg.model.pretrained} (finite values that overflow: a "
                  "broken file)" if self.task.pretrained else "the freshly initialised model")
        hint = "" if self.dtype is None else f"; in {self.dtype} arithmetic: try train.precision=fp32"
        raise TrainingDiverged(f"{what}, before any update: NaN/Inf from {source}, not from the learning rate"
                               f"{hint}; {self._kept()}")

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train until a limit, the time budget, the last phase's end, early stopping or a signal; then
        validate and save."""
        validation = self.task.validation
        self.baseline = validation.baseline()
        name = validation.baseline_name
        self.say(f"{name} validation PSNR {self.baseline['psnr']:.3f} dB on {validation.size} images")
        # Entries at this step that the saved state does not cover are written again below: drop the old ones.
        redo = {"val", "phase"} if self.step == 0 else {kind for kind, again in (
            ("val", self.val_step != self.step), ("phase", self.phases.start[0] != self.step)) if again}
        self.log = run_folder.RunLog(self.run, self.step, self.main, frozenset(redo))
        self.log.phase = self.phases.current.name
        if self.phases.many and self.step == 0:
            self.log.write(0, "phase", {})  # where each phase begins (curves.png draws it)
        self.bar = tqdm(total=self.phases.planned_steps(self.total_steps) or None, initial=self.step,
                        disable=not self.main, unit="step", dynamic_ncols=True)
        # Python lets only the main thread set handlers; elsewhere (a notebook's worker) Ctrl-C is plain.
        signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
        handlers = {s: signal.signal(s, self._on_signal) for s in signals}
        try:
            self.raw.train()
            self.updates.training()
            if self.task.pretrained and self.step == 0:
                self._validate_start()
            self._session = self._speed = (time.perf_counter(), self.step)
            self.cadence.start(self.step)
            self._start_compile()
            reason = self._stop_reason()
            while True:
                reason = self._run_phase(reason)
                if reason != PHASE_END or self.phases.last:
                    break
                if self._window:
                    self._log_train()  # the phase's last losses, so no logged mean spans two phases
                if self.val_step != self.step:
                    self._validate()  # the phase's last weights compete for best.pth
                self.say(self.phases.enter(self.phases.current.index + 1, (self.step, self.elapsed()), self.device))
                self.log.phase = self.phases.current.name
                self.log.write(self.step, "phase", {})  # where the phase begins (curves.png draws it)
                reason = self._stop_reason()
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
        if reason == PHASE_END:
            reason = f"end of the last phase, {self.phases.current.name}" if self.phases.many else reason
        self.say(f"stopped at step {self.step} ({self.stop_signal or reason}); {self._best_text()}; "
                 f"checkpoints in {self.run.dir}")

    def _run_phase(self, reason: str | None) -> str | None:
        """Steps of the current phase from ``self.step`` until a reason to stop (PHASE_END: its end)."""
        order, done = self.phases.batches, self.phases.steps_in(self.step)
        order.set_position(done // order.steps_per_epoch, done % order.steps_per_epoch)
        # One iterator for the whole phase: its workers start once and run on across epochs
        # (the loader's sampler chains them, loader.RunBatches), prefetching over epoch ends.
        batches = iter(self.phases.loader)
        try:
            while reason is None:
                with self.section("data"):
                    lr_u8, hr_u8 = next(batches)
                self._train_step(lr_u8, hr_u8)
                with self.section("after_step"):
                    reason = self._after_step()
                self.profiler.step()
        finally:
            del batches  # shuts the loader workers down now (also on an error), not at interpreter exit
            self.profiler.stop()
        return reason

    def _validate_start(self) -> None:
        """The weights the run starts from, validated before its first step: logged at step 0, and in the
        running for best.pth, so a fine-tune never ends with a best.pth worse than its start."""
        self._validate()
        self.start_psnr = self.last_psnr
        if math.isnan(self.start_psnr):
            self._broken_start("the validation PSNR of the starting weights is nan")
        base = self.baseline["psnr"]
        self.say(f"start: validation PSNR {self.start_psnr:.3f} dB ({self.task.validation.baseline_name} "
                 f"{base:.3f}, {self.start_psnr - base:+.3f} dB) before the first step")

    def _best_text(self) -> str:
        if self.val_step < 0:
            return "not validated yet"
        base, best = self.baseline["psnr"], self.best
        if not math.isnan(self.start_psnr) and best.rule == "psnr":
            return (f"start {self.start_psnr:.3f} dB -> best {best.psnr:.3f} dB ({best.psnr - self.start_psnr:+.3f} "
                    f"dB; {self.task.validation.baseline_name} {base:.3f}, {best.psnr - base:+.3f} dB)")
        psnr = f"PSNR {best.psnr:.3f} dB ({self.task.validation.baseline_name} {base:.3f}, {best.psnr - base:+.3f} dB)"
        if best.rule == "psnr":
            return f"best validation {psnr}"
        return f"best.pth: step {best.step} by {best.rule} ({psnr})"

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signal.Signals(signum).name
        # A second Ctrl-C interrupts at once instead of waiting for the step to end.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _train_step(self, lr_batch: torch.Tensor, hr_batch: torch.Tensor) -> None:
        with self.section("to_device"):
            lr, hr = self.task.to_device(lr_batch), self.task.to_device(hr_batch)
            lr, hr = self.augment(lr, hr, self.step)  # train.batch_aug (nothing when empty)
        self.phases.rates.set(self.phases.steps_in(self.step))  # the learning rates of the phase's update number
        losses = self.objective.step(self, lr, hr)
        self.step += 1
        if self.ema is not None:
            with self.section("ema"):
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
        first = self._window[0] if self.step == len(self._window) else None  # the losses of the run's first step
        self._window.clear()
        start, start_step = self._speed
        now = time.perf_counter()
        samples = (self.step - start_step) * self.train.batch_size / max(now - start, 1e-9)
        values = {**losses, "samples_per_s": samples, "learning_rate": self.optimizer.param_groups[0]["lr"],
                  "time_s": self.elapsed()}  # training clock of the run (validations included)
        self._speed = (now, self.step)
        self.log.write(self.step, "train", values)  # also the values that stop the run below, for the record
        shown = {label: f"{values[key]:.4f}" for label, key in self.objective.bar.items() if key in values}
        if math.isfinite(self.last_psnr):  # none before the first validation
            shown["psnr"] = f"{self.last_psnr:.2f}"
        self.bar.set_postfix(**shown, samples_s=f"{values['samples_per_s']:.1f}", refresh=False)
        # Every rank sees the same (all-reduced) losses, so all of them stop together.
        broken = [key for key, value in losses.items() if not math.isfinite(value)]
        if broken:
            if first is not None and not bool(first.isfinite().all()):
                self._broken_start(f"{broken[0]} is {losses[broken[0]]} from the first step on")
            self._diverged(f"{broken[0]} is {losses[broken[0]]} at step {self.step}")
        collapse = self.objective.diverged(losses, self.step)
        note = self.objective.take_note()
        if note:
            self.say(note)
        if collapse:
            kept = f"step {self._saved_step}" if self._saved_step >= 0 else "nothing saved"
            raise TrainingDiverged(f"{collapse}; {self.run.last}: {kept}; best.pth and history/ keep earlier weights")

    def _validate(self) -> float:
        """Validate (EMA weights when enabled), keep best.pth, log; returns the validation's seconds."""
        start = time.perf_counter()
        self.raw.eval()
        model = self.ema.module if self.ema is not None else self.raw  # the weights inference will use
        validation = self.task.validation
        with self.updates.evaluating():  # (schedule-free: its average, which is what it saves)
            metrics = validation(model, self.dtype)
            psnr = metrics["psnr"]
            self.last_psnr, self.val_step = psnr, self.step
            # during a loss spike best.pth waits too: the weights from before it stay the run's best
            improved = self.objective.healthy and self.best.offer(metrics, self.step, self.model_checkpoint,
                                                                   write=self.main)
        self.raw.train()
        seconds = time.perf_counter() - start
        self.bad_validations = 0 if improved else self.bad_validations + 1
        base, best = validation.baseline_name, self.best
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
        if self.phases.out_of_steps(self.step):
            return PHASE_END
        if self.world > 1 and self.step % t.log_every:
            return None  # clock and signal decisions wait for the next point where ranks agree
        decide = self._compile_pending and self.step % t.log_every == 0 and self.step > self._session[1]
        votes = Votes(signal=bool(self.stop_signal),
                      out_of_time=t.max_minutes > 0 and self.elapsed() >= t.max_minutes * 60,
                      cosine_length=self._cosine_length(),
                      compile=decide and self.main and compile_mode("auto", self.device, self._seconds_left()) != "off",
                      phase_over=self.phases.out_of_minutes(self.elapsed()),
                      ).agree(self.d)
        if votes.cosine_length > 0:
            self.phases.rates.retime(votes.cosine_length)
        if decide:  # every rank reaches this step together, and follows rank 0's vote
            self._compile_pending = False
            self.use_compile("reduce-overhead" if votes.compile else "off")
            self._profile_from = self._steady_step()
        if votes.signal:
            return "signal"
        if votes.out_of_time:
            return "time budget"
        if votes.phase_over:
            return PHASE_END
        return None

    def _cosine_length(self) -> int:
        """A cosine's length when only time bounds it (a timed phase, or train.max_minutes without a step
        limit): the steps its budget allows at the pace so far (validations included), counted from the
        phase's start. 0 = keep the current length."""
        t, rates = self.cfg.train, self.phases.rates
        if not self.main or rates.schedule.kind != "cosine" or self.step == 0 or self.step % t.log_every:
            return 0
        budget = self.phases.budget_seconds(t.max_minutes, self.total_steps)
        steps, seconds = self.phases.steps_in(self.step), self.elapsed() - self.phases.start[1]
        if budget <= 0 or steps <= 0:
            return 0
        return max(steps + 1, rates.schedule.warmup + 1, round(steps * budget / seconds))
