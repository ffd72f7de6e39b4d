"""Validation of the train stage: the contest metric on the whole images of the held-out fold.

Images are decoded by threads ahead of the model, so a validation costs about the model's time
on the device and does not wait on PNG decoding; ranks under torchrun split the images.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.dataset import read_pair
from pipeline.layout import Pair
from pipeline.runtime import autocast


def contest_psnr(sr: torch.Tensor, hr: torch.Tensor) -> float:
    """The contest metric of one image: ``sr`` (3,H,W) float in [0,1], ``hr`` (3,H,W) uint8.

    The prediction is rounded to uint8 once, as a PNG submission would be, then
    PSNR = 10 log10(255^2 / MSE) over all pixels and channels.
    """
    pred = sr.float().clamp(0, 1).mul(255).round().double()
    mse = (pred - hr.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@torch.inference_mode()
def validate_model(model: nn.Module, pairs: list[Pair], scale: int, device: torch.device, dtype: torch.dtype | None,
                   channels_last: bool, rank: int = 0, world: int = 1) -> float:
    """Mean contest PSNR over whole images; ranks take every world-th image and pool their sums."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of PSNR, images)
    for lr, hr in read_ahead(pairs[rank::world], scale):
        x = torch.from_numpy(lr).to(device).permute(2, 0, 1)[None].float().div(255)  # (h,w,3) -> (1,3,h,w)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            sr = model(x)  # (1,3,h,w) -> (1,3,4h,4w)
        hr_t = torch.from_numpy(hr).to(device).permute(2, 0, 1)  # (H,W,3) -> (3,H,W)
        totals += torch.tensor([contest_psnr(sr[0], hr_t), 1.0], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def spaced_interval(val_seconds: float, step_seconds: float, val_every: int, share: float) -> int:
    """Steps between validations so that validating takes at most ``share`` of the time: the smallest
    multiple k * val_every with val_seconds <= share * (val_seconds + k * val_every * step_seconds)."""
    if share <= 0:
        return val_every
    return val_every * max(1, math.ceil(val_seconds * (1 - share) / (share * val_every * step_seconds)))


def read_ahead(pairs: list[Pair], scale: int, ahead: int = 4) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``read_pair`` of each pair in order, decoded by two threads up to ``ahead`` images early, so the
    device does not wait for PNG decoding (OpenCV releases the GIL) and memory holds few images."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="val-read") as pool:
        queue: deque = deque()
        for pair in pairs:
            queue.append(pool.submit(read_pair, pair, scale))
            if len(queue) > ahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()


def bicubic(device: torch.device) -> nn.Module:
    from pipeline.models import Bicubic

    return Bicubic().to(device)
