"""``mri-cycle-train``: SRResCycGAN (``mri_cycle_train.model``) on unpaired LR / HR slices -> models/<run>/.

The slice task of the train stage, trained with the ``cycle`` objective
(``pipeline.mri.cycle.CycleObjective``: both generators, both discriminators, the write-up's loss
weights ``mri_cycle_train.*``, Adam at ``mri_cycle_train.learning_rate`` halved every
``mri_cycle_train.halve_every`` steps, the objective's schedule); the loop, checkpoints and exact
resume, EMA and logging are the Trainer's.

- data: the HR volumes of every item outside ``mri.val_fold`` (``mri_splits.csv``), cut into
  ``mri_cycle_train.hr_size`` slice crops along ``mri_infer.slice_axis`` (``slices.unpaired_slices``: the
  subjects alternate between the LR side, k-space downsampled 4x in-plane, and the HR side, so no
  subject is on both); sample (index, seed) = LR crop ``index`` and an HR crop drawn from the seed,
  each flipped / turned by the seed (``UnpairedSlices.sample``);
- validation: PSNR (normalised intensities, range of the HR crops) of the HR generator on the
  held-out fold's slice crops, LR by the same k-space downsampling, against bicubic;
- checkpoints hold the whole SRResCycGAN (``arch`` = its table name), so ``mri-infer run=<run>``
  rebuilds it and runs ``g_hr`` slice by slice (on LR volumes whose slices are 4x smaller in-plane).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.config import Config, with_overrides
from pipeline.core.errors import UserError
from pipeline.core.layout import VolumeLayout

if TYPE_CHECKING:  # torch and the volume modules load in the functions that build the task, after main's checks
    import torch
    from torch import nn

    from pipeline.core.distributed import Dist
    from pipeline.training.task import TrainTask


@dataclass
class SliceValidation:
    """PSNR of a 4x slice model on held-out HR crops from their k-space downsampled LR; baseline: bicubic."""

    lr: torch.Tensor  # (N,1,h,w)
    hr: np.ndarray  # (N,4h,4w)
    device: torch.device
    baseline_name: str = "bicubic"
    batch: int = 16

    @property
    def size(self) -> int:
        return len(self.hr)

    def _score(self, fn: Any) -> dict[str, float]:
        import torch

        from pipeline.mri.metrics import psnr

        with torch.inference_mode():
            sr = torch.cat([fn(self.lr[i:i + self.batch].to(self.device)).float().cpu()
                            for i in range(0, len(self.lr), self.batch)])  # (N,1,h,w) -> (N,1,4h,4w)
            return {"psnr": psnr(sr[:, 0].numpy().astype(np.float64), self.hr)}

    def __call__(self, model: nn.Module, dtype: torch.dtype | None) -> dict[str, float]:
        return self._score(model)  # fp32: the slices are small

    def baseline(self) -> dict[str, float]:
        import torch.nn.functional as F

        from pipeline.mri.cycle import SCALE

        return self._score(lambda x: F.interpolate(x, scale_factor=SCALE, mode="bicubic", align_corners=False))


def _hr_volumes(cfg: Config, held_out: bool) -> list[tuple[str, Any]]:
    """(subject, HR Volume) of the validation fold (``held_out``) or of every other item."""
    from pipeline.mri.splits import read_splits
    from pipeline.mri.volumes import read_volume

    root = Path(cfg.mri.dir)
    table = read_splits(root)
    table = table[(table["fold"] == cfg.mri.val_fold) == held_out].sort_values("item")
    if table.empty:
        raise UserError(f"{root}: no item {'in' if held_out else 'outside'} the validation fold "
                        f"mri.val_fold={cfg.mri.val_fold}")
    return [(row.subject, read_volume(root / row.path, int(row.volume), cfg.mri.max_voxels))
            for row in table.itertuples()]


def cycle_task(cfg: Config, d: Dist) -> TrainTask:
    """The SRResCycGAN slice task (module docstring) for ``pipeline.train.run``."""
    import torch

    from pipeline.mri.cycle import SCALE, cycle_objective
    from pipeline.mri.data import SeededSamples
    from pipeline.mri.models import build_volume_model, volume_model_kwargs
    from pipeline.mri.predict import spec_of
    from pipeline.mri.slices import kspace_downsample, slice_crops, unpaired_slices
    from pipeline.training.loader import run_loader
    from pipeline.training.task import TrainTask

    c, axis = cfg.mri_cycle_train, cfg.mri_infer.slice_axis
    name = c.model
    if spec_of(name).role != "cycle":
        raise UserError(f"mri_cycle_train.model={name} is a {spec_of(name).role}; mri-cycle-train trains "
                        "srrescycgan models")
    if c.hr_size % SCALE:
        raise UserError(f"mri_cycle_train.hr_size={c.hr_size} must divide by {SCALE}")
    model = build_volume_model(name).to(d.device)
    slices = unpaired_slices(_hr_volumes(cfg, False), c.hr_size, SCALE, axis)
    loader, batches = run_loader(SeededSamples(slices), cfg, d)
    held_out = np.concatenate([slice_crops(v, axis, c.hr_size) for _, v in _hr_volumes(cfg, True)])
    lr = torch.from_numpy(kspace_downsample(held_out, SCALE))[:, None]  # (N,H,W) -> (N,1,H/4,W/4)
    validation = SliceValidation(lr, held_out.astype(np.float64), d.device)

    def to_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(d.device, non_blocking=True).float()

    def discriminator(_name: str, _loss: str) -> tuple[nn.Module, dict[str, Any]]:
        raise UserError("SRResCycGAN brings its own two discriminators; leave gan.discriminator empty")

    return TrainTask(generator=model, arch=name, kwargs=volume_model_kwargs(name), loader=loader, batches=batches,
                     to_device=to_device, validation=validation, discriminator=discriminator,
                     sample_pixels=(c.hr_size // SCALE) ** 2, objective=cycle_objective,
                     objective_label="cycle",
                     description=f"{len(slices.lr)} LR / {len(slices.hr)} HR unpaired slice crops of {c.hr_size} px")


def main(cfg: Config) -> None:
    """Train ``mri_cycle_train.model`` on unpaired slices of ``mri.dir``; outputs in ``paths.models/run``."""
    if cfg.gan.discriminator:
        raise UserError("mri-cycle-train uses SRResCycGAN's own discriminators; leave gan.discriminator empty")
    VolumeLayout(Path(cfg.mri.dir)).need_splits()  # before torch loads
    from pipeline.training.run import run

    # The generators start at mri_cycle_train.learning_rate; the objective's schedule (cycle.cycle_schedule: halved
    # every mri_cycle_train.halve_every steps) drives both optimizers, so the saved config says train.scheduler=step.
    run(with_overrides(cfg, **{"train.learning_rate": cfg.mri_cycle_train.learning_rate, "train.scheduler": "step"}),
        cycle_task, data_root=cfg.mri.dir)
