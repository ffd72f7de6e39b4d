"""What the train stage trains on what: the ``TrainTask`` a setup hands to the Trainer.

The Trainer (pipeline/training/loop.py) owns everything that is the same for every kind of data:
the loop, checkpoints and exact resume, EMA, logging, signals, time budgets and DDP. An objective
(pipeline/training/objectives.py) owns what one step optimises. A task owns the rest, which depends on the
data: the generator and how a checkpoint rebuilds it, the discriminators that fit its samples,
the training batches, how a batch reaches the device, and the validation.

The tasks: ``pipeline.train.image_task`` (the model table, patches of ``data.dir``, contest PSNR
on whole held-out images), ``pipeline.mri.train.volume_task`` (mDCSRN on 3-D patches, masked
volume PSNR, a 3-D critic for ``gan.discriminator``) and ``pipeline.mri.cycle_train``'s slice task
(SRResCycGAN on unpaired slices, which brings its own objective). Each is a function
``(cfg, dist) -> TrainTask`` whose loader comes from ``pipeline.train.run_loader`` (the (index,
seed) order, so resumes stay exact); ``pipeline.train.run(cfg, make_task)`` trains it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.training.loader import EpochBatches
from pipeline.training.validation import Validation


@dataclass
class TrainTask:
    """The data-dependent parts of a training run (see the module docstring)."""

    generator: nn.Module  # built, loaded from model.pretrained when given, on the device
    arch: str  # the table name and keyword arguments that rebuild the generator (stored in checkpoints)
    kwargs: dict[str, Any]
    loader: DataLoader  # batches without end, in ``batches``' order, from its current position on
    batches: EpochBatches
    to_device: Callable[[torch.Tensor], torch.Tensor]  # a loader tensor -> a float tensor on the device
    validation: Validation
    # (gan.discriminator, gan.loss) -> (discriminator, its full keyword arguments); a UserError when
    # that discriminator cannot judge this task's samples or be that loss's critic.
    discriminator: Callable[[str, str], tuple[nn.Module, dict[str, Any]]]
    sample_pixels: int  # input pixels (voxels) of one training sample: the precision rule's step size
    description: str  # the training data in a few words, for the start line
    note: str = ""  # said once at the start (e.g. what was detected in a weights file)
    pretrained: bool = False  # the generator starts from trained weights: they are validated before the first step
    # (the config of a phase of train.phases, its index) -> that phase's loader and order (its crop and batch);
    # None: the task runs one phase
    loader_for: Callable[[Any, int], tuple[DataLoader, EpochBatches]] | None = None
    save_card: Callable[[Path], Any] | None = None  # writes models/<run>/model.yaml once the start's checks pass
    # A builder (cfg, task, dist, dtype, total_steps) -> Objective this task trains with (e.g. the cycle
    # objective of pipeline/mri/cycle.py); None = the config's, from pipeline.training.objectives.OBJECTIVES.
    objective: Callable[..., Any] | None = None
    objective_label: str = ""  # that objective's name, for the precision rule (runtime.RunKind.objective)
