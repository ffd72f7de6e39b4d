"""Validation of the train stage: the contest metric on the whole images of the held-out fold.

The Trainer (pipeline/training/loop.py) takes its validation from the task it trains, as anything
with the ``Validation`` interface: ``ImageValidation`` here (contest PSNR on whole images, plus
LPIPS when its weights are given, against MATLAB bicubic); a volume task brings its own (masked
volume PSNR against the interpolated input).

Images are decoded by threads ahead of the model, so a validation costs about the model's time
on the device and does not wait on PNG decoding; ranks under torchrun split the images.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.core.images import read_ahead
from pipeline.core.layout import Pair
from pipeline.core.metrics import contest_psnr
from pipeline.core.runtime import autocast
from pipeline.training.patch_data import read_pair


class Validation(Protocol):
    """What the Trainer asks of a task's validation. Metrics are means over the held-out items,
    equal on every rank: ``psnr`` always (higher is better), ``lpips`` when measured (lower is better)."""

    baseline_name: str  # the reference the model must beat (logged as val/<name>_psnr)
    size: int  # held-out items

    def __call__(self, model: nn.Module, dtype: torch.dtype | None) -> dict[str, float]:
        """The metrics of ``model`` (in eval mode, the weights inference will use), run under ``dtype`` autocast."""
        ...

    def baseline(self) -> dict[str, float]:
        """The same metrics of the baseline."""
        ...


@dataclass
class ImageValidation:
    """Contest PSNR (and LPIPS with ``lpips``, a model from ``perceptual.load_lpips``) on whole images."""

    pairs: list[Pair]
    scale: int
    device: torch.device
    channels_last: bool
    rank: int = 0
    world: int = 1
    lpips: nn.Module | None = None
    baseline_name: str = "bicubic"
    crop: int = 0  # train.val_crop: the centre LR crop of each image (0 = whole images)

    @property
    def size(self) -> int:
        return len(self.pairs)

    def __call__(self, model: nn.Module, dtype: torch.dtype | None) -> dict[str, float]:
        return score_images(model, self.pairs, self.scale, self.device, dtype, self.channels_last, self.rank,
                            self.world, self.lpips, self.crop)

    def baseline(self) -> dict[str, float]:
        return score_images(bicubic(self.device), self.pairs, self.scale, self.device, None, False, self.rank,
                            self.world, self.lpips, self.crop)


@torch.inference_mode()
def score_images(model: nn.Module, pairs: list[Pair], scale: int, device: torch.device, dtype: torch.dtype | None,
                 channels_last: bool, rank: int = 0, world: int = 1,
                 lpips: nn.Module | None = None, crop: int = 0) -> dict[str, float]:
    """Mean contest PSNR (and LPIPS of the uint8 prediction, given ``lpips``) over whole images, or over the
    centre ``crop`` x ``crop`` LR crop of each (and its HR); ranks take every world-th image and pool their sums."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # (sum of PSNR, sum of LPIPS, images)
    # decoded by two threads up to 4 images early (OpenCV releases the GIL): the device does not wait
    mine = [(pair, pair) for pair in pairs[rank::world]]
    for _pair, (lr, hr) in read_ahead(mine, functools.partial(read_pair, scale=scale), depth=4, workers=2):
        if crop:
            lr, hr = centre_crop(lr, hr, crop, scale)
        x = torch.from_numpy(lr).to(device).permute(2, 0, 1)[None].float().div(255)  # (h,w,3) -> (1,3,h,w)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            sr = model(x)  # (1,3,h,w) -> (1,3,4h,4w)
        hr_t = torch.from_numpy(hr).to(device).permute(2, 0, 1)  # (H,W,3) -> (3,H,W)
        distance = 0.0
        if lpips is not None:  # on the prediction as a PNG would store it, like `evaluate`
            pred = sr[:1].float().clamp(0, 1).mul(255).round().div(255)
            distance = lpips(pred, hr_t[None].float().div(255), normalize=True).item()
        totals += torch.tensor([contest_psnr(sr[0], hr_t), distance, 1.0], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
    psnr, distance = (totals[:2] / totals[2]).tolist()
    return {"psnr": psnr, "lpips": distance} if lpips is not None else {"psnr": psnr}


def centre_crop(lr: np.ndarray, hr: np.ndarray, side: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """The centre ``side`` x ``side`` crop of an LR image (its whole extent where smaller) and the HR under it."""
    h, w = lr.shape[:2]
    y, x = max(0, (h - side) // 2), max(0, (w - side) // 2)
    lr = lr[y:y + side, x:x + side]
    return lr, hr[y * scale:(y + lr.shape[0]) * scale, x * scale:(x + lr.shape[1]) * scale]


def spaced_interval(val_seconds: float, step_seconds: float, val_every: int, share: float) -> int:
    """Steps between validations so that validating takes at most ``share`` of the time: the smallest
    multiple k * val_every with val_seconds <= share * (val_seconds + k * val_every * step_seconds)."""
    if share <= 0:
        return val_every
    return val_every * max(1, math.ceil(val_seconds * (1 - share) / (share * val_every * step_seconds)))


@dataclass
class ValidationCadence:
    """When the train stage validates: every ``val_every`` steps, spaced out to a multiple of it when
    validating would take more than ``share`` of the time (``spaced_interval``; not when ``fixed``,
    i.e. deterministic runs). Under torchrun the ranks agree on the largest spacing."""

    val_every: int
    share: float
    fixed: bool
    device: torch.device
    world: int = 1
    every: int = 0  # steps between validations now
    next: int = 0  # the step of the next validation
    since: tuple[float, int] = (0.0, 0)  # (clock, step) at the end of the last validation (or session start)

    def start(self, step: int) -> None:
        """A session begins at ``step``: the fixed cadence, counted from step 0."""
        self.every, self.since = self.val_every, (time.perf_counter(), step)
        self.next = (step // self.every + 1) * self.every

    def plan(self, seconds: float, step: int) -> bool:
        """After a validation of ``seconds`` at ``step``: the next one's step; True when the spacing changed."""
        clock, last = self.since
        train_seconds = max(time.perf_counter() - seconds - clock, 1e-9)  # (plots, logs: training's side)
        self.since = (time.perf_counter(), step)
        every = self.val_every
        if not self.fixed and step > last:
            every = spaced_interval(seconds, train_seconds / (step - last), self.val_every, self.share)
        if self.world > 1:
            shared = torch.tensor([every], dtype=torch.float64, device=self.device)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            every = int(shared.item())
        changed, self.every, self.next = every != self.every, every, step + every
        return changed


def bicubic(device: torch.device) -> nn.Module:
    from pipeline.models.table import Bicubic

    return Bicubic().to(device)
