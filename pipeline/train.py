"""Train stage: data/<set>/patches -> models/<run>/ (checkpoints, log.jsonl, curves.png, tb/).

The image task of the training package (``pipeline.training``): the model table's ``model.name``
or the network of an authors' file (``model.arch``), or the weights file in ``model.pretrained``
(its architecture detected when it is not model.name or model.arch), trained on the patches of
every fold but ``data.val_fold`` (random crops and the 8 dihedral transforms,
``pipeline.training.patch_data``), and validated with the contest metric on that fold's whole
images against MATLAB bicubic (``pipeline.training.validation``). What a step optimises is the
run's objective (``pipeline.training.objectives``): ``psnr`` (loss = train.loss_l1 * L1 +
train.loss_mse * MSE on [0,1] pixels, plus loss.* terms when weighted) or, with gan.discriminator
set, ``gan`` (adversarial fine-tuning of a PSNR run). Everything else
(the loop, checkpoints and exact resume, EMA, DDP under torchrun, compile) is
``pipeline.training.run``'s, shared with the volume trainers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import Config
from pipeline.core.errors import UserError
from pipeline.core.layout import DataLayout, RunLayout

if TYPE_CHECKING:  # torch and the training package load in the functions that build the task, after main's check
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from pipeline.core.distributed import Dist
    from pipeline.training.loader import EpochBatches
    from pipeline.training.task import TrainTask


def build_trainable(cfg: Config) -> nn.Module:
    """The table's model, model.arch's network, or either with the weights of ``model.pretrained`` (a file that is
    not model.name is detected); a resumed run whose model.pretrained file is gone is rebuilt from its own
    last.pth (which holds arch and weights)."""
    from pipeline.models import arch_file
    from pipeline.models.checkpoint import load_weights_file
    from pipeline.models.table import ModelCard, build_model, card_of, count_parameters

    spec = arch_file.spec_of(cfg.model)
    if cfg.model.pretrained:
        last = RunLayout(Path(cfg.paths.models), cfg.run).last
        if not Path(cfg.model.pretrained).exists() and cfg.train.resume != "never" and last.is_file():
            model = load_weights_file(last, ema=False, arch=spec)  # its weights are replaced by last.pth's state
            card = card_of(model)
            model.card = ModelCard(card.arch, card.kwargs, card.precisions,
                                   f"model.pretrained={cfg.model.pretrained} is gone: {card.arch} rebuilt from "
                                   f"{last}, which this start resumes", card.detected)
            return model
        return load_weights_file(cfg.model.pretrained, cfg.model.name, arch=spec)
    model = arch_file.build(spec, *arch_file.read_source(spec.path)) if spec else build_model(cfg.model.name)
    if count_parameters(model) == 0:
        what = f"model.arch={cfg.model.arch}" if spec else f"model.name={cfg.model.name}"
        raise UserError(f"{what} has no parameters to train; it is a baseline: use it directly, e.g. `infer {what}`")
    return model


def _loader(cfg: Config, d: Dist, model: nn.Module, stream: int = 0) -> tuple[DataLoader, EpochBatches, int]:
    """The training loader, its epoch order, and the LR side of a training sample (crop or patch);
    ``stream``: the phase of train.phases (whose crop and batch ``cfg`` holds)."""
    from pipeline.models.archs import MIN_SIDE, smallest_side
    from pipeline.models.table import card_of
    from pipeline.training.loader import run_loader
    from pipeline.training.patch_data import PairAugment, PatchDataset, read_pair

    t = cfg.train
    pairs = DataLayout(Path(cfg.data.dir)).patches.training_pairs(cfg.data.val_fold)
    side = min(read_pair(pairs[0], cfg.data.scale)[0].shape[:2])
    # Caught here, before the run folder is touched (and for every phase of train.phases, before the first step).
    if t.crop > side:
        raise UserError(f"train.crop={t.crop} is larger than the LR patches ({side} px, {pairs[0].lr_path}); "
                        f"use a crop <= {side}, or 0 for whole patches")
    least = smallest_side(model)
    if (t.crop or side) < least:
        what = f"train.crop={t.crop}" if t.crop else f"the LR patches ({side} px, {pairs[0].lr_path}, train.crop=0)"
        raise UserError(f"{what}: too small to train {card_of(model).arch} on: its samples need >= {least} LR "
                        "pixels per side (" + ("a 1-pixel sample is one colour, nothing to upscale" if least == MIN_SIDE
                                               else "smaller ones would be mostly its padding") + "); use a crop "
                        f"of {least}..{side}" + ("" if t.crop else ", or patchify larger patches"))
    dataset = PatchDataset(pairs, PairAugment(t.crop, cfg.data.scale, t.augment), cfg.data.scale)
    loader, batches = run_loader(dataset, cfg, d, stream)
    return loader, batches, t.crop or side


def image_task(cfg: Config, d: Dist) -> TrainTask:
    """The 2-D image task: the model table's ``model.name``, the patches of ``data.dir``, contest PSNR
    (and LPIPS with evaluate.lpips_weights) on the held-out fold's whole images against bicubic."""
    import torch

    from pipeline.models.checkpoint import save_model_card
    from pipeline.models.discriminators import build_discriminator, check_discriminator, discriminator_kwargs
    from pipeline.models.table import card_of, check_scale
    from pipeline.training.task import TrainTask
    from pipeline.training.validation import ImageValidation

    t = cfg.train
    check_scale(cfg.data.scale)
    model = build_trainable(cfg).to(d.device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader, batches, side = _loader(cfg, d, model)
    lpips = None
    if cfg.evaluate.lpips_weights:
        from pipeline.models.perceptual import load_lpips

        lpips = load_lpips(cfg.evaluate.lpips_net, cfg.evaluate.lpips_weights).to(d.device)
    validation = ImageValidation(DataLayout(Path(cfg.data.dir)).validation_pairs(cfg.data.val_fold), cfg.data.scale,
                                 d.device, t.channels_last, d.rank, d.world, lpips, crop=t.val_crop)

    def to_device(x: torch.Tensor) -> torch.Tensor:
        x = x.to(d.device, non_blocking=True).float().div_(255)  # (b,3,h,w) uint8 -> float in [0,1]
        return x.contiguous(memory_format=torch.channels_last) if t.channels_last else x

    def discriminator(name: str, loss: str) -> tuple[nn.Module, dict[str, Any]]:
        check_discriminator(name, loss, side * cfg.data.scale)  # HR crops of the training samples
        return build_discriminator(name), discriminator_kwargs(name)

    card = card_of(model)  # the table's entry, or what was detected in model.pretrained
    def loader_for(phase: Config, index: int) -> tuple[DataLoader, EpochBatches]:
        return _loader(phase, d, model, index)[:2]

    return TrainTask(generator=model, arch=card.arch, kwargs=card.kwargs, loader=loader, batches=batches,
                     loader_for=loader_for, pretrained=bool(cfg.model.pretrained),
                     to_device=to_device, validation=validation, discriminator=discriminator,
                     sample_pixels=side**2, description=f"{batches.n} patches of LR {side} px", note=card.note,
                     save_card=lambda path: save_model_card(path, model, cfg.model.pretrained))


def main(cfg: Config) -> None:
    """Train ``model.name`` on the patches of ``data.dir``; outputs in ``paths.models/run``."""
    DataLayout(Path(cfg.data.dir)).patches.need_manifest()  # a wrong --data is reported before torch loads
    from pipeline.training.run import run

    run(cfg, image_task, data_root=cfg.data.dir)
