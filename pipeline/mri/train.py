"""``mri-train``: a same-grid volume model (mDCSRN) on 3-D patches of a prepared volume folder -> models/<run>/.

The volume task of the train stage (``pipeline.training.task``): everything but the data is the
image trainer's (``pipeline.train.run``: the loop, checkpoints and exact resume, EMA, AMP, DDP,
the objectives). What differs:

- generator: ``mri_train.model`` from the volume table (``pipeline.mri.models``), or the volume
  checkpoint in ``model.pretrained`` (a WGAN-GP fine-tune starts from the L1 run's best.pth, EMA
  weights); checkpoints store its table name and kwargs, so ``mri-infer run=<run>`` rebuilds it;
- data: the LR / HR pairs of every item outside ``mri.val_fold`` (``data.load_pairs``, the LR grid
  from ``lr/degradation.yaml``), cut into ``mri_train.patch``^3 foreground patches (overlapping by
  ``mri_train.stride``); sample (index, seed) = that patch with the interpolation of thick-slice
  LR, the 3-D flips and the in-plane rotation drawn from the seed (``data.PatchDataset.sample``),
  batches (B,1,s,s,s) in ``EpochBatches``' order;
- validation: masked PSNR (and SSIM / NRMSE, logged) in real-world units on the held-out fold's
  whole volumes, through the inference path (``data.score_volumes``, ``mri_infer`` tiling), against
  the tricubic interpolation of the LR (k-space LR: the LR itself);
- ``gan.discriminator``: a critic of the volume table (``critic3d``); WGAN-GP needs one without
  batch norm. The objective is the image trainer's: ``psnr`` (L1 only: ``train.loss_l1=1
  train.loss_mse=0``) or ``gan`` (``gan.loss=wgan-gp``, ``gan.critic_steps``, ``gan.gp_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import Config, MriConfig
from pipeline.core.errors import UserError
from pipeline.core.layout import VolumeLayout

if TYPE_CHECKING:  # torch and the volume modules load in the functions that build the task, after main's checks
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from pipeline.core.distributed import Dist
    from pipeline.mri.data import ValItem
    from pipeline.mri.models import VolumeModelSpec
    from pipeline.mri.predict import VolumeSettings
    from pipeline.training.loader import EpochBatches
    from pipeline.training.task import TrainTask

BASELINE = "tricubic"


@dataclass
class VolumeValidation:
    """Masked volume PSNR / SSIM / NRMSE on whole held-out volumes; baseline: the tricubic LR."""

    items: list[ValItem]
    spec: VolumeModelSpec
    mri: MriConfig
    settings: VolumeSettings
    device: torch.device
    baseline_name: str = BASELINE

    @property
    def size(self) -> int:
        return len(self.items)

    def __call__(self, model: nn.Module, dtype: torch.dtype | None) -> dict[str, float]:
        # Every rank scores every volume (a few volumes; the ranks then agree without a reduction).
        # fp32 whatever the training autocast: these are the numbers mri-evaluate reports.
        from pipeline.mri.data import score_volumes

        table = score_volumes(model, self.spec, self.items, self.mri, self.settings, self.device)
        return {k: float(table[k].mean()) for k in ("psnr", "ssim", "nrmse")}

    def baseline(self) -> dict[str, float]:
        from pipeline.mri.metrics import score_volume
        from pipeline.mri.predict import grid_factors, interpolate

        rows = [score_volume(interpolate(v.lr, grid_factors(self.mri), self.baseline_name).data, v.hr, v.mask)
                for v in self.items]
        return {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr", "ssim", "nrmse")}


def _generator(cfg: Config, device: torch.device) -> tuple[nn.Module, str, dict[str, Any], str]:
    """(generator, table name, full kwargs, a note) of ``mri_train.model`` or the checkpoint ``model.pretrained``."""
    from pipeline.mri.models import build_volume_model, volume_model_from_checkpoint, volume_model_kwargs
    from pipeline.mri.predict import spec_of

    name = cfg.mri_train.model
    if cfg.model.arch:
        raise UserError(f"model.arch={cfg.model.arch}: an architecture file is for 2-D image networks (train, "
                        "infer, export); mri-train trains mri_train.model")
    spec = spec_of(name)
    if spec.role != "generator" or spec.dims != 3 or spec.scale != (1, 1, 1):
        raise UserError(f"mri_train.model={name} is a {spec.role} ({spec.dims}-D); mri-train trains same-grid 3-D "
                        "generators such as mdcsrn")
    if not cfg.model.pretrained:
        return build_volume_model(name).to(device), name, volume_model_kwargs(name), ""
    model, arch, meta = volume_model_from_checkpoint(cfg.model.pretrained, ema=True)
    if arch != name:
        raise UserError(f"model.pretrained={cfg.model.pretrained} holds a {arch}, but mri_train.model={name}: "
                        f"set mri_train.model={arch}")
    note = f"generator from {cfg.model.pretrained} (step {meta.get('step', '?')}, EMA weights)"
    return model.train().to(device), arch, dict(meta.get("kwargs", volume_model_kwargs(arch))), note


def _check(cfg: Config) -> None:
    if cfg.loss.perceptual > 0:
        raise UserError("loss.perceptual needs RGB images (VGG19); volumes train with train.loss_l1 / loss_mse, "
                        "tv and gan.*: set loss.perceptual=0")
    if cfg.train.crop:
        raise UserError("train.crop is for image patches; volumes are cut to mri_train.patch^3: set train.crop=0")


def volume_task(cfg: Config, d: Dist) -> TrainTask:
    """The volume task (module docstring) for ``pipeline.train.run``."""
    from pipeline.mri.data import PatchDataset, SeededSamples, load_pairs, validation_items
    from pipeline.mri.lrset import read_record
    from pipeline.mri.models import build_volume_model, volume_model_kwargs
    from pipeline.mri.predict import VolumeSettings, spec_of
    from pipeline.training.loader import run_loader
    from pipeline.training.task import TrainTask

    _check(cfg)
    c = cfg.mri_train
    root = Path(cfg.mri.dir)
    mri = read_record(root)  # the LR grid as mri-prepare made it
    model, arch, kwargs, note = _generator(cfg, d.device)
    patches = PatchDataset(load_pairs(root, mri, exclude_fold=cfg.mri.val_fold), c.patch, c.stride, mri,
                           c.min_foreground, cfg.train.augment)
    loader, batches = run_loader(SeededSamples(patches), cfg, d)
    validation = VolumeValidation(validation_items(root, mri, cfg.mri.val_fold), spec_of(arch), mri,
                                  VolumeSettings.from_config(cfg.mri_infer), d.device)

    def to_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(d.device, non_blocking=True).float()  # (b,1,s,s,s), normalised intensities

    def discriminator(name: str, loss: str) -> tuple[nn.Module, dict[str, Any]]:
        spec = spec_of(name)
        if spec.role != "critic" or spec.dims != 3:
            raise UserError(f"gan.discriminator={name} is not a 3-D critic of the volume table; use critic3d")
        kw = volume_model_kwargs(name)
        if loss == "wgan-gp" and kw.get("norm") == "batch":
            raise UserError(f"gan.loss=wgan-gp needs a critic without batch norm; gan.discriminator={name} has it")
        return build_volume_model(name), kw

    def loader_for(phase: Config, index: int) -> tuple[DataLoader, EpochBatches]:
        return run_loader(SeededSamples(patches), phase, d, index)

    return TrainTask(generator=model, arch=arch, kwargs=kwargs, loader=loader, batches=batches, to_device=to_device,
                     loader_for=loader_for, pretrained=bool(cfg.model.pretrained),
                     validation=validation, discriminator=discriminator, sample_pixels=c.patch**3,
                     description=f"{batches.n} patches of {c.patch}^3 from {len(patches.pairs)} volume(s)", note=note)


def main(cfg: Config) -> None:
    """Train ``mri_train.model`` on the volumes of ``mri.dir``; outputs in ``paths.models/run``."""
    _check(cfg)  # the settings and the prepared folder before torch loads (volume_task checks each phase's again)
    VolumeLayout(Path(cfg.mri.dir)).need_record()
    from pipeline.training.run import run

    run(cfg, volume_task, data_root=cfg.mri.dir)  # mri-prepare rewrites lr/ and mri_splits.csv: not meanwhile
