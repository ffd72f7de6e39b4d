"""Train stage: data/<set>/patches -> models/<run>/ (checkpoints, log.jsonl, curves.png, tb/).

One process, or one per GPU under ``torchrun`` (DistributedDataParallel; train.batch_size stays the
global batch, each rank takes batch_size/world of it). Loss = train.loss_l1 * L1 + train.loss_mse *
MSE on [0,1] pixels. Validation is the contest metric on the whole images of the held-out fold, with
the weights inference will use (EMA when enabled). ``last.pth`` holds the full training state, so a
run killed at any moment resumes from its last save; with train.deterministic on the CPU the resumed
run ends with exactly the weights of an uninterrupted one (tests/test_train.py checks with SIGKILL).

This module is the setup; the loop is pipeline/train_loop.py, the data order pipeline/dataset.py,
the run folder pipeline/train_io.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pipeline import train_io
from pipeline.checkpoint import CheckpointError, load_checkpoint, load_weights_file, save_model_card
from pipeline.config import Config, TrainConfig, save_config
from pipeline.dataset import EpochBatches, PairAugment, PatchDataset, read_pair, training_patches, validation_images
from pipeline.errors import UserError
from pipeline.models import autocast_cap, build_model, card_of, count_parameters
from pipeline.runtime import autocast_dtype, peak_memory, pick_device, precision_name, seed_everything
from pipeline.train_loop import Trainer


@dataclass(frozen=True)
class Dist:
    """Where this process sits among the training processes (rank 0 of 1 without torchrun)."""

    rank: int
    world: int
    device: torch.device


def _init_distributed(deterministic: bool) -> Dist:
    if deterministic:
        # cuBLAS reads this at its first call to pick deterministic kernels.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device()  # the LOCAL_RANK-th GPU under torchrun
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank() if world > 1 else 0, world, device)


def _check(t: TrainConfig) -> None:
    for key in ("batch_size", "val_every", "save_every", "log_every"):
        if getattr(t, key) < 1:
            raise UserError(f"train.{key}={getattr(t, key)} must be >= 1")
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


def _own_process_group(_worker_id: int) -> None:
    # Ctrl-C (and `kill -- -PGID`) signal the terminal's whole process group. Loader workers leave
    # it, so only the main process hears the signal: it saves, then stops them. They keep the
    # default SIGTERM action, so nothing else changes: dying with the main process, exit handlers.
    os.setpgid(0, 0)


def _loader(cfg: Config, d: Dist) -> tuple[DataLoader, EpochBatches]:
    t = cfg.train
    pairs = training_patches(cfg.data.dir, cfg.data.val_fold)
    side = min(read_pair(pairs[0], cfg.data.scale)[0].shape[:2])
    if t.crop > side:  # caught here, before the run folder is touched
        raise UserError(f"train.crop={t.crop} is larger than the LR patches ({side} px, {pairs[0].lr_path}); "
                        f"use a crop <= {side}, or 0 for whole patches")
    dataset = PatchDataset(pairs, PairAugment(t.crop, cfg.data.scale, t.augment), cfg.data.scale)
    batches = EpochBatches(len(pairs), t.batch_size, cfg.seed, d.rank, d.world)
    # The loader's own generator keeps it off the global torch RNG (which a resume restores and
    # drop-path layers use); the data order comes from `batches` alone, whatever the worker count.
    # Workers are not persistent: the loop drops each epoch's iterator, which shuts them down
    # cleanly, also when a run stops mid-epoch.
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=t.workers, pin_memory=d.device.type == "cuda",
                        worker_init_fn=_own_process_group, generator=torch.Generator())
    return loader, batches


def _ddp(model: nn.Module, d: Dist) -> nn.Module:
    """Gradients averaged across the ranks in buckets during backward (NCCL on GPUs, gloo on CPUs)."""
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def _resume_from(cfg: Config, d: Dist, run_dir: Path, model: nn.Module) -> dict | None:
    """The state in models/<run>/last.pth when resuming; otherwise rank 0 clears the folder."""
    last = run_dir / "last.pth"
    if cfg.train.resume == "force" and not last.is_file():
        raise UserError(f"train.resume=force but {last} does not exist")
    resume = cfg.train.resume != "never" and last.is_file()
    if d.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            train_io.clear_run(run_dir)
        save_config(cfg, run_dir / "config.yaml")
        save_model_card(run_dir / "model.yaml", model, cfg.model.pretrained)
    if d.world > 1:
        dist.barrier()  # no rank reads the folder while rank 0 may be clearing it
    if not resume:
        return None
    state = load_checkpoint(last, map_location=d.device)
    if state.get("arch") != card_of(model).arch:
        raise CheckpointError(f"{last}: a {state.get('arch')} run, but this start builds {card_of(model).arch}; "
                              "use another run name or train.resume=never")
    return state


def main(cfg: Config) -> None:
    """Train ``model.name`` on the patches of ``data.dir``; outputs in ``paths.models/run``."""
    t = cfg.train
    _check(t)
    d = _init_distributed(t.deterministic)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        run_dir = Path(cfg.paths.models) / cfg.run
        dtype = autocast_dtype(d.device, t.precision)
        if t.deterministic:
            # warn_only: a GPU op without a deterministic kernel (nearest upsampling's backward)
            # names itself in a warning instead of killing the run at its first step.
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif d.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one patch size: autotuned kernels pay off
            torch.set_float32_matmul_precision("high")
        seed_everything(cfg.seed)  # the same initial weights on every rank
        model = build_trainable(cfg).to(d.device)
        dtype = autocast_cap([model], dtype, d.device)  # fp16-unsafe architectures stay in bf16/fp32
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loader, batches = _loader(cfg, d)
        val_pairs = validation_images(cfg.data.dir, cfg.data.val_fold)
        optimizer_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[t.optimizer]
        optimizer = optimizer_cls(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
        limits = [n for n in (t.max_steps, t.max_epochs * batches.steps_per_epoch) if n > 0]
        total_steps = min(limits) if limits else 0
        scheduler = _make_scheduler(t, optimizer, batches.steps_per_epoch, total_steps)
        # EMA decay warms up (1 - (1+step)^-2/3, capped at train.ema_decay) so short runs get a useful average.
        ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=True) if t.ema_decay > 0 else None
        scaler = torch.amp.GradScaler(d.device.type, enabled=dtype is torch.float16)  # bf16 needs no scaling
        state = _resume_from(cfg, d, run_dir, model)
        torch.manual_seed(cfg.seed + d.rank)  # ranks draw different drop-path masks

        trainer = Trainer(
            cfg=cfg, rank=d.rank, world=d.world, device=d.device, dtype=dtype, run_dir=run_dir, raw=model,
            model=_ddp(model, d) if d.world > 1 else model, ema=ema, optimizer=optimizer,
            scheduler=scheduler, scaler=scaler, loader=loader, batches=batches, val_pairs=val_pairs,
            total_steps=total_steps, arch=card_of(model).arch, kwargs=card_of(model).kwargs)
        if state is not None:
            trainer.load_state(state, run_dir / "last.pth")
        trainer.say(f"train {card_of(model).arch} ({count_parameters(model) / 1e6:.3f}M parameters) on {d.device} "
                    f"x{d.world}, {precision_name(dtype)}, {batches.n} patches, {batches.steps_per_epoch} "
                    f"steps/epoch, global batch {t.batch_size}"
                    + (f"; resuming {run_dir / 'last.pth'} at step {trainer.step}" if state else "")
                    + (f"\n{card_of(model).note}" if card_of(model).note else ""))
        with peak_memory(d.device) as memory:
            trainer.fit()
        trainer.say(f"peak memory {memory['peak_mib']:.0f} MiB")
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
