"""Train stage: data/<set>/patches -> models/<run>/ (checkpoints, log.jsonl, curves.png, tb/).

One process, or one per GPU under ``torchrun`` (DistributedDataParallel; train.batch_size stays the
global batch, each rank takes batch_size/world of it). What a step optimises is the run's objective
(pipeline/objectives.py): ``psnr`` (loss = train.loss_l1 * L1 + train.loss_mse * MSE on [0,1] pixels,
plus loss.* terms when weighted) or, with gan.discriminator set, ``gan`` (adversarial fine-tuning of
a PSNR run: a discriminator with its own optimizer, scheduler and scaler, critic updates before
each generator update). Validation is the contest metric on the whole images of the held-out fold,
with the weights inference will use (EMA when enabled). ``last.pth`` holds the full training state
(both networks and optimisers of a GAN run), so a run killed at any moment resumes from its last
save; with train.deterministic on the CPU the resumed run ends with exactly the weights of an
uninterrupted one (tests/test_train.py and tests/test_train_gan.py check with SIGKILL).

On a GPU the setup follows measured rules (pipeline/runtime.py): a fused Adam update, TF32 for fp32,
bf16 only for steps large enough to be arithmetic-bound, torch.compile of PSNR steps where the run is
long enough (train.compile, applied by the loop); the loader's workers live for the whole session.

This module is the setup (``run``: everything any task needs; ``image_task``: the 2-D image task);
the loop is pipeline/train_loop.py, the objectives pipeline/objectives.py, the task interface
pipeline/train_task.py, the data order pipeline/dataset.py, the run folder pipeline/train_io.py,
validation pipeline/validation.py, profiling pipeline/train_profile.py.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline import train_io
from pipeline.checkpoint import CheckpointError, load_checkpoint, load_weights_file, save_model_card
from pipeline.config import Config, save_config
from pipeline.dataset import EpochBatches, PairAugment, PatchDataset, read_pair
from pipeline.discriminators import build_discriminator, check_discriminator, discriminator_kwargs
from pipeline.distributed import Dist, barrier, init_distributed, shutdown, wrap_ddp
from pipeline.errors import Interrupted, UserError
from pipeline.files import clean_stale
from pipeline.layout import DataLayout, RunLayout
from pipeline.models import autocast_cap, build_model, card_of, count_parameters
from pipeline.objectives import (
    Objective,
    build_objective,
    build_optimizer,
    check_objective,
    make_scheduler,
)
from pipeline.runtime import enable_tf32, peak_memory, precision_name, seed_everything, train_autocast_dtype
from pipeline.train_loop import Trainer
from pipeline.train_task import TrainTask
from pipeline.validation import ImageValidation


def _check(cfg: Config) -> None:
    # (numeric bounds are checked when the config loads: pipeline.config.opt)
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    check_objective(cfg)


def build_trainable(cfg: Config) -> nn.Module:
    """The table's model, or the one in ``model.pretrained`` (detected when it is not model.name)."""
    if cfg.model.pretrained:
        return load_weights_file(cfg.model.pretrained, cfg.model.name)
    model = build_model(cfg.model.name)
    if count_parameters(model) == 0:
        raise UserError(f"model.name={cfg.model.name} has no parameters to train; it is a baseline: "
                        f"use it directly, e.g. `infer model.name={cfg.model.name}`")
    return model


class RunBatches(Sampler[list[tuple[int, int]]]):
    """EpochBatches' batches from its current position on, epoch after epoch, without end.

    One loader iterator then serves a whole training session: its workers start once, keep
    prefetching across epoch ends, and stop when the loop drops the iterator. The order is still
    EpochBatches' (a function of seed, epoch and step), so resumes stay exact.
    """

    def __init__(self, epochs: EpochBatches) -> None:
        self.epochs = epochs

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epochs.epoch, self.epochs.start
        while True:
            self.epochs.set_position(epoch, start)
            yield from iter(self.epochs)
            epoch, start = epoch + 1, 0


def _own_process_group(_worker_id: int) -> None:
    # Ctrl-C (and `kill -- -PGID`) signal the terminal's whole process group. Loader workers leave
    # it, so only the main process hears the signal: it saves, then stops them. They keep the
    # default SIGTERM action, so nothing else changes: dying with the main process, exit handlers.
    os.setpgid(0, 0)


def _loader(cfg: Config, d: Dist) -> tuple[DataLoader, EpochBatches, int]:
    """The training loader, its epoch order, and the LR side of a training sample (crop or patch)."""
    t = cfg.train
    pairs = DataLayout(Path(cfg.data.dir)).patches.training_pairs(cfg.data.val_fold)
    side = min(read_pair(pairs[0], cfg.data.scale)[0].shape[:2])
    if t.crop > side:  # caught here, before the run folder is touched
        raise UserError(f"train.crop={t.crop} is larger than the LR patches ({side} px, {pairs[0].lr_path}); "
                        f"use a crop <= {side}, or 0 for whole patches")
    dataset = PatchDataset(pairs, PairAugment(t.crop, cfg.data.scale, t.augment), cfg.data.scale)
    loader, batches = run_loader(dataset, cfg, d)
    return loader, batches, t.crop or side


def run_loader(dataset: Dataset, cfg: Config, d: Dist) -> tuple[DataLoader, EpochBatches]:
    """The training loader of a task whose ``dataset`` takes (index, sample seed) keys, and its epoch order."""
    t = cfg.train
    batches = EpochBatches(len(dataset), t.batch_size, cfg.seed, d.rank, d.world)  # type: ignore[arg-type]
    # The loader's own generator keeps it off the global torch RNG (which a resume restores and
    # drop-path layers use); the data order comes from `batches` alone, whatever the worker count.
    # The sampler never ends (RunBatches), so the loop's one iterator keeps its workers for the
    # session; pinned batches let the copy to the GPU run asynchronously.
    loader = DataLoader(dataset, batch_sampler=RunBatches(batches), num_workers=t.workers,
                        pin_memory=d.device.type == "cuda", worker_init_fn=_own_process_group,
                        prefetch_factor=t.prefetch if t.workers else None, generator=torch.Generator())
    return loader, batches


def image_task(cfg: Config, d: Dist) -> TrainTask:
    """The 2-D image task: the model table's ``model.name``, the patches of ``data.dir``, contest PSNR
    (and LPIPS with evaluate.lpips_weights) on the held-out fold's whole images against bicubic."""
    t = cfg.train
    model = build_trainable(cfg).to(d.device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader, batches, side = _loader(cfg, d)
    lpips = None
    if cfg.evaluate.lpips_weights:
        from pipeline.perceptual import load_lpips

        lpips = load_lpips(cfg.evaluate.lpips_net, cfg.evaluate.lpips_weights).to(d.device)
    validation = ImageValidation(DataLayout(Path(cfg.data.dir)).validation_pairs(cfg.data.val_fold), cfg.data.scale,
                                 d.device, t.channels_last, d.rank, d.world, lpips)

    def to_device(x: torch.Tensor) -> torch.Tensor:
        x = x.to(d.device, non_blocking=True).float().div_(255)  # (b,3,h,w) uint8 -> float in [0,1]
        return x.contiguous(memory_format=torch.channels_last) if t.channels_last else x

    def discriminator(name: str, loss: str) -> tuple[nn.Module, dict[str, Any]]:
        check_discriminator(name, loss, side * cfg.data.scale)  # HR crops of the training samples
        return build_discriminator(name), discriminator_kwargs(name)

    card = card_of(model)  # the table's entry, or what was detected in model.pretrained
    return TrainTask(generator=model, arch=card.arch, kwargs=card.kwargs, loader=loader, batches=batches,
                     to_device=to_device, validation=validation, discriminator=discriminator,
                     sample_pixels=side**2, description=f"{batches.n} patches of LR {side} px", note=card.note,
                     save_card=lambda path: save_model_card(path, model, cfg.model.pretrained))


def _moved_aside_advice(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; use another run name, or train.resume=never to start over (the old "
                           "run is moved aside, not deleted)")


def _resume_from(cfg: Config, d: Dist, run: RunLayout, arch: str, objective: Objective) -> tuple[dict | None, float]:
    """(state of last.pth when resuming, else None; score of the best.pth already on disk, else -inf).

    ``arch`` is what this start builds (the table name, or ``spandrel:<ArchId>`` for a detected file).
    Trained weights are never deleted: ``train.resume=never`` over a run that has any moves the old
    folder aside (rank 0, saying where) before starting. All checks happen before anything moves.
    """
    if cfg.train.resume == "force" and not run.last.is_file():
        raise UserError(f"train.resume=force but {run.last} does not exist")
    state = None
    if cfg.train.resume != "never" and run.last.is_file():
        state = load_checkpoint(run.last, map_location=d.device)
        if state.get("arch") != arch:
            raise _moved_aside_advice(run.last, f"a {state.get('arch')} run, but this start builds {arch}")
        if state.get("objective", "psnr") != objective.name:
            raise _moved_aside_advice(run.last, f"the state of a {state.get('objective', 'psnr')} run, but this is a "
                                                f"{objective.name} run (a GAN fine-tune of a PSNR run starts a new run "
                                                f"with model.pretrained={run.best})")
    floor = -math.inf
    if cfg.train.resume == "never":
        if d.rank == 0 and run.dir.exists() and run.has_weights():
            moved = train_io.move_aside(run)
            print(f"train.resume=never: the earlier run {run.dir} was moved to {moved}", flush=True)
    elif run.best.is_file():
        best = load_checkpoint(run.best)
        if best.get("arch") != arch:
            raise _moved_aside_advice(run.best, f"weights of a {best.get('arch')} run, but this start builds {arch}")
        if best.get("best_by", "psnr") != objective.best_by:
            raise _moved_aside_advice(run.best, f"chosen by {best.get('best_by', 'psnr')}, but this run keeps the "
                                                f"best by {objective.best_by} (gan.best)")
        floor = train_io.best_score_of(best, objective.best_by)
    barrier(d)  # no rank reads the folder while rank 0 may be moving it
    return state, floor


def main(cfg: Config) -> None:
    """Train ``model.name`` on the patches of ``data.dir``; outputs in ``paths.models/run``."""
    run(cfg, image_task)


def run(cfg: Config, make_task: Callable[[Config, Dist], TrainTask]) -> None:
    """Train the task ``make_task(cfg, dist)`` builds with the objective of ``cfg``; outputs in ``paths.models/run``."""
    t = cfg.train
    _check(cfg)
    d = init_distributed(t.deterministic)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        run_dir = RunLayout(Path(cfg.paths.models), cfg.run)
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
        task = make_task(cfg, d)
        model, batches = task.generator, task.batches
        dtype = train_autocast_dtype(d.device, t.precision, t.batch_size // d.world * task.sample_pixels,
                                     t.deterministic)
        dtype = autocast_cap([model], dtype, d.device)  # fp16-unsafe architectures stay in bf16/fp32
        optimizer = build_optimizer(t, model, d.device)
        limits = [n for n in (t.max_steps, t.max_epochs * batches.steps_per_epoch) if n > 0]
        total_steps = min(limits) if limits else 0
        scheduler = make_scheduler(t, optimizer, batches.steps_per_epoch, total_steps)
        # EMA decay warms up (1 - (1+step)^-2/3, capped at train.ema_decay) so short runs get a useful average.
        ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=True) if t.ema_decay > 0 else None
        scaler = torch.amp.GradScaler(d.device.type, enabled=dtype is torch.float16)  # bf16 needs no scaling
        objective = build_objective(cfg, task, d, dtype, total_steps)
        state, best_floor = _resume_from(cfg, d, run_dir, task.arch, objective)
        torch.manual_seed(cfg.seed + d.rank)  # ranks draw different drop-path masks

        trainer = Trainer(
            cfg=cfg, rank=d.rank, world=d.world, device=d.device, dtype=dtype, run=run_dir, raw=model,
            model=wrap_ddp(model, d), ema=ema, optimizer=optimizer,
            scheduler=scheduler, scaler=scaler, loader=task.loader, batches=batches, validation=task.validation,
            to_device=task.to_device, objective=objective, total_steps=total_steps, arch=task.arch,
            kwargs=task.kwargs)
        trainer.best.floor = best_floor
        if state is not None:
            trainer.load_state(state, run_dir.last)
        if d.rank == 0:  # only now that every check passed: a failed start leaves the old config
            save_config(cfg, run_dir.config)
            if task.save_card is not None:
                task.save_card(run_dir.model_card)
            for folder in (run_dir.dir, run_dir.history_dir):
                clean_stale(folder)  # temporary checkpoint files of a killed earlier session
        trainer.say(_start_line(cfg, d, trainer, task, dtype)
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


def _start_line(cfg: Config, d: Dist, trainer: Trainer, task: TrainTask, dtype: torch.dtype | None) -> str:
    t, objective = cfg.train, trainer.objective
    fp32 = "fp32 (TF32)" if d.device.type == "cuda" else "fp32"
    update = "fused" if trainer.optimizer.defaults.get("fused") else "foreach"
    group = f" (DDP, {dist.get_backend()})" if d.distributed else ""
    what = f"train {task.arch} ({count_parameters(task.generator) / 1e6:.3f}M parameters){objective.describe()}"
    compile_ = t.compile if objective.compiles else f"off ({objective.name.upper()} steps run eager)"
    return (f"{what} on {d.device} x{d.world}{group}, {precision_name(dtype) if dtype else fp32}, {update} "
            f"{t.optimizer}, compile {compile_}, "
            f"{task.description}, {task.batches.steps_per_epoch} steps/epoch, global batch {t.batch_size}")
