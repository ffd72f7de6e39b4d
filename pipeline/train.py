"""Train stage: data/<set>/patches -> models/<run>/ (checkpoints, log.jsonl, curves.png, tb/).

One process, or one per GPU under ``torchrun`` (DistributedDataParallel; train.batch_size stays the
global batch, each rank takes batch_size/world of it). Loss = train.loss_l1 * L1 + train.loss_mse *
MSE on [0,1] pixels. Validation is the contest metric on the whole images of the held-out fold, with
the weights inference will use (EMA when enabled). ``last.pth`` holds the full training state, so a
run killed at any moment resumes from its last save; with train.deterministic on the CPU the resumed
run ends with exactly the weights of an uninterrupted one (tests/test_train.py checks with SIGKILL).

On a GPU the setup follows measured rules (pipeline/runtime.py): a fused Adam update, TF32 for fp32,
bf16 only for steps large enough to be arithmetic-bound, torch.compile where the run is long enough
(train.compile, applied by the loop); the loader's workers live for the whole session (RunBatches).

This module is the setup; the loop is pipeline/train_loop.py, the data order pipeline/dataset.py,
the run folder pipeline/train_io.py, validation pipeline/validation.py, profiling pipeline/train_profile.py.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from pipeline import train_io
from pipeline.checkpoint import CheckpointError, load_checkpoint, load_weights_file, save_model_card
from pipeline.config import Config, TrainConfig, save_config
from pipeline.dataset import EpochBatches, PairAugment, PatchDataset, read_pair
from pipeline.distributed import Dist, barrier, init_distributed, shutdown
from pipeline.errors import Interrupted, UserError
from pipeline.files import clean_stale
from pipeline.layout import DataLayout, RunLayout
from pipeline.models import autocast_cap, build_model, card_of, count_parameters
from pipeline.runtime import (
    enable_tf32,
    optimizer_flags,
    peak_memory,
    precision_name,
    seed_everything,
    train_autocast_dtype,
)
from pipeline.train_loop import Trainer


def _check(t: TrainConfig) -> None:
    # (numeric bounds are checked when the config loads: pipeline.config.opt)
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")


def build_trainable(cfg: Config) -> nn.Module:
    """The table's model, or the one in ``model.pretrained`` (detected when it is not model.name)."""
    if cfg.model.pretrained:
        return load_weights_file(cfg.model.pretrained, cfg.model.name)
    model = build_model(cfg.model.name)
    if count_parameters(model) == 0:
        raise UserError(f"model.name={cfg.model.name} has no parameters to train; it is a baseline: "
                        f"use it directly, e.g. `infer model.name={cfg.model.name}`")
    return model


def _make_scheduler(t: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    total_steps: int) -> Scheduler | None:
    """timm schedulers, stepped per update (t_in_epochs=False) so a resume mid-epoch is exact.

    A cosine run with only a time budget starts with a provisional length; the loop re-estimates it
    from the measured pace at every log point (Trainer._pace) so the decay ends with the budget.
    With no limit at all (train until stopped) the cosine never gets going: a constant rate.
    """
    if t.scheduler == "step":
        return StepLRScheduler(optimizer, decay_t=t.step_epochs * steps_per_epoch, decay_rate=t.step_gamma,
                               t_in_epochs=False)
    if t.scheduler == "cosine":
        length = max(total_steps or 10**9, t.warmup_steps + 1)
        return CosineLRScheduler(optimizer, t_initial=length, lr_min=t.min_learning_rate, warmup_t=t.warmup_steps,
                                 warmup_lr_init=t.min_learning_rate, t_in_epochs=False)
    return None


def build_optimizer(t: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Adam / AdamW with this device's update kernel (runtime.optimizer_flags: fused on CUDA)."""
    optimizer_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[t.optimizer]
    return optimizer_cls(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay,
                         **optimizer_flags(device))


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
    batches = EpochBatches(len(pairs), t.batch_size, cfg.seed, d.rank, d.world)
    # The loader's own generator keeps it off the global torch RNG (which a resume restores and
    # drop-path layers use); the data order comes from `batches` alone, whatever the worker count.
    # The sampler never ends (RunBatches), so the loop's one iterator keeps its workers for the
    # session; pinned batches let the copy to the GPU run asynchronously.
    loader = DataLoader(dataset, batch_sampler=RunBatches(batches), num_workers=t.workers,
                        pin_memory=d.device.type == "cuda", worker_init_fn=_own_process_group,
                        prefetch_factor=t.prefetch if t.workers else None, generator=torch.Generator())
    return loader, batches, t.crop or side


def _ddp(model: nn.Module, d: Dist) -> nn.Module:
    """Gradients averaged across the ranks in buckets during backward (NCCL on GPUs, gloo on CPUs)."""
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def _resume_from(cfg: Config, d: Dist, run: RunLayout, arch: str) -> tuple[dict | None, float]:
    """(state of last.pth when resuming, else None; PSNR of the best.pth already on disk, else -inf).

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
            raise CheckpointError(f"{run.last}: a {state.get('arch')} run, but this start builds {arch}; use "
                                  "another run name, or train.resume=never to start over (the old run is moved "
                                  "aside, not deleted)")
    floor = -math.inf
    if cfg.train.resume == "never":
        if d.rank == 0 and run.dir.exists() and run.has_weights():
            moved = train_io.move_aside(run)
            print(f"train.resume=never: the earlier run {run.dir} was moved to {moved}", flush=True)
    elif run.best.is_file():
        best = load_checkpoint(run.best)
        if best.get("arch") != arch:
            raise CheckpointError(f"{run.best}: weights of a {best.get('arch')} run, but this start builds "
                                  f"{arch}; use another run name, or train.resume=never to start over (the old run "
                                  "is moved aside, not deleted)")
        floor = float(best.get("psnr", best.get("best_psnr", -math.inf)))
    barrier(d)  # no rank reads the folder while rank 0 may be moving it
    return state, floor


def main(cfg: Config) -> None:
    """Train ``model.name`` on the patches of ``data.dir``; outputs in ``paths.models/run``."""
    t = cfg.train
    _check(t)
    d = init_distributed(t.deterministic)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        run = RunLayout(Path(cfg.paths.models), cfg.run)
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
        model = build_trainable(cfg).to(d.device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loader, batches, side = _loader(cfg, d)
        dtype = train_autocast_dtype(d.device, t.precision, t.batch_size // d.world * side**2)
        dtype = autocast_cap([model], dtype, d.device)  # fp16-unsafe architectures stay in bf16/fp32
        val_pairs = DataLayout(Path(cfg.data.dir)).validation_pairs(cfg.data.val_fold)
        optimizer = build_optimizer(t, model, d.device)
        limits = [n for n in (t.max_steps, t.max_epochs * batches.steps_per_epoch) if n > 0]
        total_steps = min(limits) if limits else 0
        scheduler = _make_scheduler(t, optimizer, batches.steps_per_epoch, total_steps)
        # EMA decay warms up (1 - (1+step)^-2/3, capped at train.ema_decay) so short runs get a useful average.
        ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=True) if t.ema_decay > 0 else None
        scaler = torch.amp.GradScaler(d.device.type, enabled=dtype is torch.float16)  # bf16 needs no scaling
        state, best_floor = _resume_from(cfg, d, run, card_of(model).arch)
        torch.manual_seed(cfg.seed + d.rank)  # ranks draw different drop-path masks

        trainer = Trainer(
            cfg=cfg, rank=d.rank, world=d.world, device=d.device, dtype=dtype, run=run, raw=model,
            model=_ddp(model, d) if d.distributed else model, ema=ema, optimizer=optimizer,
            scheduler=scheduler, scaler=scaler, loader=loader, batches=batches, val_pairs=val_pairs,
            total_steps=total_steps, arch=card_of(model).arch, kwargs=card_of(model).kwargs)
        trainer.best_floor = best_floor
        if state is not None:
            trainer.load_state(state, run.last)
        if d.rank == 0:  # only now that every check passed: a failed start leaves the old config
            save_config(cfg, run.config)
            save_model_card(run.model_card, model, cfg.model.pretrained)
            for folder in (run.dir, run.history_dir):
                clean_stale(folder)  # temporary checkpoint files of a killed earlier session
        fp32 = "fp32 (TF32)" if d.device.type == "cuda" else "fp32"
        update = "fused" if optimizer.defaults.get("fused") else "foreach"
        group = f" (DDP, {dist.get_backend()})" if d.distributed else ""
        card = card_of(model)
        trainer.say(f"train {card.arch} ({count_parameters(model) / 1e6:.3f}M parameters) on {d.device} "
                    f"x{d.world}{group}, {precision_name(dtype) if dtype else fp32}, {update} {t.optimizer}, "
                    f"compile {t.compile}, {batches.n} patches of LR {side} px, {batches.steps_per_epoch} "
                    f"steps/epoch, global batch {t.batch_size}"
                    + (f"; resuming {run.last} at step {trainer.step}" if state else "")
                    + (f"\n{card.note}" if card.note else ""))
        with peak_memory(d.device) as memory:
            trainer.fit()
        trainer.say(f"peak memory {memory['peak_mib']:.0f} MiB")
        if trainer.stop_signal:
            raise Interrupted(getattr(signal, trainer.stop_signal),
                              f"stopped by {trainer.stop_signal} at step {trainer.step} after saving {run.last}; "
                              "the same command resumes")
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        shutdown(d)
