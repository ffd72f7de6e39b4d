"""``run(cfg, make_task)``: one training run of any task, from setup to the last save.

One process, or one per GPU under ``torchrun`` (DistributedDataParallel; train.batch_size stays the
global batch, each rank takes batch_size/world of it). The setup: the process group and device,
deterministic algorithms, seeds, the task (``make_task(cfg, dist)``: generator, data, validation),
the precision, the objective, the generator's updates, and the resume point; then the
``Trainer`` (pipeline/training/loop.py) trains until a limit.

On a GPU the setup follows measured rules (pipeline/core/runtime.py): a fused Adam update, TF32 for
fp32, bf16 only for steps large enough to be arithmetic-bound, torch.compile of PSNR steps where
the run is long enough (train.compile, applied by the loop); the loader's workers live for the
whole session. ``last.pth`` holds the full training state, so a run killed at any moment resumes
from its last save; with train.deterministic on the CPU the resumed run ends with exactly the
weights of an uninterrupted one (tests/test_train.py and tests/test_train_gan.py check with SIGKILL).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.core.config import Config, save_config
from pipeline.core.distributed import Dist, barrier, init_distributed, shutdown
from pipeline.core.errors import Interrupted, UserError
from pipeline.core.files import clean_stale
from pipeline.core.layout import RunLayout
from pipeline.core.locks import FolderLock, data_lock, run_lock
from pipeline.core.runtime import Precision, RunKind, enable_tf32, peak_memory, seed_everything, train_precision
from pipeline.models.arch_file import check_resumable
from pipeline.models.checkpoint import CheckpointError, load_checkpoint
from pipeline.models.table import autocast_cap, count_parameters
from pipeline.training import phases, run_folder
from pipeline.training.loop import Trainer
from pipeline.training.objectives import Objective, build_objective, check_objective, objective_name
from pipeline.training.task import TrainTask
from pipeline.training.updates import SCHEDULE_FREE, GeneratorUpdates


def _check(cfg: Config) -> None:
    """The settings as a whole, before any folder is locked or read (numeric bounds are checked when the
    config loads: pipeline.core.config.opt)."""
    t = cfg.train
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if 0 < t.blowup <= 1:  # a factor over the lowest loss: at <= 1 any log point above the lowest stops the run
        raise UserError(f"train.blowup={t.blowup:g} would stop a healthy run at its first loss above the lowest "
                        "so far: use a factor > 1 (default 10), or 0 to turn the check off")
    phases.plan(cfg)  # every phase's names and lengths
    check_objective(cfg)


def _check_run(cfg: Config, task: TrainTask, objective: Objective) -> None:
    """Settings the task or its objective cannot follow (known once both are built), every phase's
    against the data (its crop, its batch) before the first step."""
    if cfg.train.phases and not (objective.phased and task.loader_for is not None):
        raise UserError(f"train.phases: the {objective.name} objective of this task runs one phase; leave "
                        "train.phases empty")
    if cfg.train.optimizer == SCHEDULE_FREE and objective.name != "psnr":
        raise UserError(f"train.optimizer={SCHEDULE_FREE} is for PSNR runs (the {objective.name} objective has "
                        "optimizers of its own); use adam or adamw")
    for phase in phases.plan(cfg)[1:]:  # (the first phase's loader is the task's own)
        assert task.loader_for is not None
        try:
            task.loader_for(phase.cfg, phase.index)  # its checks only: the loader starts no worker until iterated
        except UserError as exc:
            raise UserError(f"train.phases[{phase.index}] ({phase.name}): {exc}") from None


def _pretrained_of(state: dict) -> str:
    """The model.pretrained a last.pth's run started from ('' = none, or not recorded)."""
    config = state.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    pretrained = model.get("pretrained") if isinstance(model, dict) else None
    return pretrained if isinstance(pretrained, str) else ""


def _optimizer_of(state: dict) -> str | None:
    """The train.optimizer a last.pth was saved by: its config's (else told by schedule-free's own state)."""
    config = state.get("config")
    train = config.get("train") if isinstance(config, dict) else None
    if isinstance(train, dict) and isinstance(train.get("optimizer"), str):
        return train["optimizer"]
    saved = state.get("optimizer")
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if isinstance(groups, list) and groups and isinstance(groups[0], dict):
        return SCHEDULE_FREE if "train_mode" in groups[0] else None
    return None


def _moved_aside_advice(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; use another run name, or train.resume=never to start over (the old "
                           "run is moved aside, not deleted)")


def _resume_from(cfg: Config, d: Dist, run: RunLayout, task: TrainTask, objective: Objective,
                 ) -> tuple[dict | None, float]:
    """(state of last.pth when resuming, else None; score of the best.pth already on disk, else -inf).

    ``task.arch`` is what this start builds (the table name, ``spandrel:<ArchId>`` for a detected file,
    ``file:<path>:<Class>`` for an architecture file, which must also be unchanged: ``task.kwargs`` has its hash).
    Trained weights are never deleted: ``train.resume=never`` over a run that has any moves the old
    folder aside (rank 0, saying where) before starting. All checks happen before anything moves.
    """
    arch = task.arch
    if cfg.train.resume == "force" and not run.last.is_file():
        raise UserError(f"train.resume=force but {run.last} does not exist")
    state = None
    if cfg.train.resume != "never" and run.last.is_file():
        state = load_checkpoint(run.last, map_location=d.device)
        check_resumable(state, run.last, arch, task.kwargs)
        if state.get("arch") != arch:
            started = _pretrained_of(state)
            if started and started != cfg.model.pretrained:  # a fine-tune resumed without its model.pretrained
                raise CheckpointError(f"{run.last}: a {state.get('arch')} run started from model.pretrained="
                                      f"{started}, but this start builds {arch}: resume it with model.pretrained="
                                      f"{started} (its last.pth stands in for that file when it is gone)")
            raise _moved_aside_advice(run.last, f"a {state.get('arch')} run, but this start builds {arch}")
        if state.get("objective", "psnr") != objective.name:
            raise _moved_aside_advice(run.last, f"the state of a {state.get('objective', 'psnr')} run, but this is a "
                                                f"{objective.name} run (a GAN fine-tune of a PSNR run starts a new run "
                                                f"with model.pretrained={run.best})")
        saved = _optimizer_of(state)
        if saved is not None and saved != cfg.train.optimizer:
            raise CheckpointError(
                f"{run.last}: saved by train.optimizer={saved}, but this start uses train.optimizer="
                f"{cfg.train.optimizer}: one optimizer's state does not carry over to another. Resume with "
                f"train.optimizer={saved}, or start afresh from its weights: another run name with "
                f"model.pretrained={run.last} (or train.resume=never, which moves this run aside)")
    floor = -math.inf
    if cfg.train.resume == "never":
        if d.rank == 0 and run.dir.exists() and run.has_weights():
            moved = run_folder.move_aside(run)
            print(f"train.resume=never: the earlier run {run.dir} was moved to {moved}", flush=True)
    elif run.best.is_file():
        best = load_checkpoint(run.best)
        check_resumable(best, run.best, arch, task.kwargs)
        if best.get("arch") != arch:
            raise _moved_aside_advice(run.best, f"weights of a {best.get('arch')} run, but this start builds {arch}")
        if best.get("best_by", "psnr") != objective.best_by:
            raise _moved_aside_advice(run.best, f"chosen by {best.get('best_by', 'psnr')}, but this run keeps the "
                                                f"best by {objective.best_by} (gan.best)")
        floor = run_folder.best_score_of(best, objective.best_by)
    barrier(d)  # no rank reads the folder while rank 0 may be moving it
    return state, floor


def run(cfg: Config, make_task: Callable[[Config, Dist], TrainTask], data_root: str | Path | None = None) -> None:
    """Train the task ``make_task(cfg, dist)`` builds with the objective of ``cfg``; outputs in ``paths.models/run``.
    ``data_root``: the data folder the task reads, held with a shared lock so that no stage rewrites it meanwhile."""
    t = cfg.train
    _check(cfg)
    d = init_distributed(t.deterministic)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    locks: list[FolderLock] = []
    try:
        run_dir = RunLayout(Path(cfg.paths.models), cfg.run)
        if d.main:
            # One process owns the run folder for the whole session (rank 0 writes for all ranks), and reads
            # the data folder under a shared lock: a patchify would rewrite the patches under the loader.
            locks.append(run_lock(run_dir.models_root, run_dir.run).acquire())
            if data_root is not None:
                locks.append(data_lock(data_root, "train", shared=True).acquire())
        if d.device.type == "cuda":
            enable_tf32()  # fp32 steps (precision auto on small steps, or fp32) run on the tensor cores
        if t.deterministic:
            # warn_only: a GPU op without a deterministic kernel (nearest upsampling's backward)
            # names itself in a warning instead of killing the run at its first step.
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif d.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one patch size: autotuned kernels pay off
        seed_everything(cfg.seed)  # the same initial weights on every rank
        first = phases.plan(cfg)[0]  # the run starts with the settings of its first phase (train.* without phases)
        task = make_task(first.cfg, d)
        start = first.cfg.train
        chosen = train_precision(d.device, t.precision, run_kind(cfg, task),
                                 start.batch_size // d.world * task.sample_pixels, t.deterministic)
        dtype = autocast_cap([task.generator], chosen.dtype, d.device)  # fp16-unsafe architectures stay in bf16/fp32
        if dtype != chosen.dtype:
            chosen = Precision(dtype, f"{chosen.why}; {task.arch} is not safe in {chosen.name}")
        limits = [n for n in (t.max_steps, t.max_epochs * task.batches.steps_per_epoch) if n > 0]
        total_steps = min(limits) if limits else 0
        objective = build_objective(first.cfg, task, d, dtype, first.steps or total_steps)
        _check_run(cfg, task, objective)
        updates = GeneratorUpdates.build(start, task.generator, d.device, dtype, objective.schedule)
        state, best_floor = _resume_from(cfg, d, run_dir, task, objective)
        torch.manual_seed(cfg.seed + d.rank)  # ranks draw different drop-path masks

        trainer = Trainer(cfg=cfg, d=d, run=run_dir, task=task, objective=objective, updates=updates, dtype=dtype,
                          total_steps=total_steps, best_floor=best_floor)
        if state is not None:
            run_folder.load_training_state(trainer, state, run_dir.last)
        if d.rank == 0:  # only now that every check passed: a failed start leaves the old config
            save_config(cfg, run_dir.config)
            if task.save_card is not None:
                task.save_card(run_dir.model_card)
            for folder in (run_dir.dir, run_dir.history_dir):
                clean_stale(folder)  # temporary checkpoint files of a killed earlier session
        trainer.say(_start_line(cfg, trainer, chosen)
                    + (f"; resuming {run_dir.last} at step {trainer.step}" if state else "")
                    + (f"\n{task.note}" if task.note else ""))
        with peak_memory(d.device) as memory:
            trainer.fit()
        trainer.say(f"peak memory {memory['peak_mib']:.0f} MiB")
        if trainer.stop_signal:
            raise Interrupted(getattr(signal, trainer.stop_signal),
                              f"stopped by {trainer.stop_signal} at step {trainer.step} after saving {run_dir.last}; "
                              "the same command resumes")
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        shutdown(d)
        for lock in reversed(locks):
            lock.release()


def run_kind(cfg: Config, task: TrainTask) -> RunKind:
    """What the run is for the precision rule: 3-D convolutions in the generator make it a volume run."""
    volume = any(isinstance(m, torch.nn.Conv3d) for m in task.generator.modules())
    objective = task.objective_label if task.objective is not None else objective_name(cfg)
    return RunKind("volume" if volume else "image", objective, cfg.gan.loss if objective == "gan" else "")


def _start_line(cfg: Config, trainer: Trainer, chosen: Precision) -> str:
    t, objective, task, d = trainer.train, trainer.objective, trainer.task, trainer.d
    tf32 = " (TF32)" if d.device.type == "cuda" and chosen.dtype is None else ""
    update = "fused" if trainer.optimizer.defaults.get("fused") else "foreach"
    group = f" (DDP, {dist.get_backend()})" if d.distributed else ""
    what = f"train {task.arch} ({count_parameters(task.generator) / 1e6:.3f}M parameters){objective.describe()}"
    compile_ = t.compile if objective.compiles else f"off ({objective.name.upper()} steps run eager)"
    return (f"{what} on {d.device} x{d.world}{group}, {chosen.name}{tf32} ({chosen.why}), {update} "
            f"{t.optimizer}, compile {compile_}, "
            f"{task.description}, {task.batches.steps_per_epoch} steps/epoch, global batch {t.batch_size}"
            + (f"; {len(trainer.phases.all)} phases ({', '.join(p.name for p in trainer.phases.all)})"
               if cfg.train.phases else ""))
