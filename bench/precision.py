"""bf16 against fp32 on this CPU: are its bf16 kernels sound, and how much faster are they?

Soundness (the default): each case runs one convolution's forward and backward ``--repeats`` times on
the same tensors and counts the repeats whose weight gradient is not finite or differs from the first
finite one (a sound kernel gives 0 and 0 on every repeat: the same inputs, the same arithmetic). The
cases are the shapes the networks meet: a 3-D convolution over a 2-voxel side (the 3-D critic's last
layers on 16^3 patches), larger 3-D sides, and the 2-D convolutions of the image networks. The
precision policy (``pipeline.core.runtime.BF16_UNSTABLE``) keeps a kind of run in fp32 where a case fails.

    python -m bench.precision                 # ~1 min on 2 cores; the machine line names the CPU's bf16 kind

Speed (``--speed``): the seconds of a training step (Adam, 2 L1 + MSE, channels_last, as the train stage
steps) and of a whole-image forward, fp32 and bf16 interleaved in one process, for the networks of the
shipped recipes at their sizes: edsr-tiny (configs/demo.yaml: batch 8 of 16-px crops), a published
network (configs/finetune.yaml: batch 4 of 48-px crops, batch 2 of whole 128-px patches) and a 512^2
image. Run it on a quiet machine.

    python -m bench.precision --speed --weights ../shared/weights/craft_x4_ntire2024_team34.pth
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import machine, table


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]  # input (N,C,*spatial)
    kernel: int


CASES = (
    Case("3-D critic's last layers: 2^3 voxels", (2, 16, 2, 2, 2), 3),
    Case("same, 32 channels", (2, 32, 2, 2, 2), 3),
    Case("same, batch 8", (8, 16, 2, 2, 2), 3),
    Case("3-D, 4^3 voxels", (2, 32, 4, 4, 4), 3),
    Case("3-D, 8^3 voxels", (2, 16, 8, 8, 8), 3),
    Case("2-D, 2^2 pixels", (2, 32, 2, 2), 3),
    Case("2-D, 16^2 (edsr-tiny crop)", (8, 32, 16, 16), 3),
)


def check(case: Case, dtype: torch.dtype, repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    x = torch.randn(*case.shape, dtype=dtype)
    channels, dims = case.shape[1], len(case.shape) - 2
    w = torch.randn(channels, channels, *[case.kernel] * dims, dtype=dtype, requires_grad=True)
    conv = F.conv3d if dims == 3 else F.conv2d
    grad_out, first, bad, differ = None, None, 0, 0
    for _ in range(repeats):
        y = conv(x, w, padding=case.kernel // 2)
        grad_out = torch.randn_like(y) if grad_out is None else grad_out
        (gw,) = torch.autograd.grad(y, w, grad_out)
        if not bool(torch.isfinite(gw).all()):
            bad += 1
        elif first is None:
            first = gw
        elif not torch.equal(first, gw):
            differ += 1
    return {"case": case.name, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "repeats": repeats, "not_finite": bad, "differs": differ}


def _seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # the kernels' one-off set-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_step(model: nn.Module, batch: int, side: int, bf16: bool) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    lr = torch.rand(batch, 3, side, side).contiguous(memory_format=torch.channels_last)
    hr = torch.rand(batch, 3, 4 * side, 4 * side)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            sr = model(lr)
        loss = 2 * F.l1_loss(sr.float(), hr) + F.mse_loss(sr.float(), hr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def _forward(model: nn.Module, side: int, bf16: bool) -> Callable[[], None]:
    lr = torch.rand(1, 3, side, side).contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(lr)
    return forward


def speed(weights: Path | None, repeats: int) -> list[dict[str, object]]:
    from pipeline.core.heap import keep_freed_memory
    from pipeline.models.checkpoint import load_weights_file
    from pipeline.models.table import build_model

    keep_freed_memory()  # as every stage does
    cases: list[tuple[str, nn.Module, str, int, int]] = [("edsr-tiny", build_model("edsr-tiny"), "train", 8, 16)]
    if weights is not None:
        published = load_weights_file(weights, "edsr-tiny")
        name = weights.stem
        cases += [(name, published, "train", 4, 48), (name, published, "train", 2, 128),
                  (name, published, "forward", 1, 512)]
    rows = []
    for name, model, kind, batch, side in cases:
        model = model.to(memory_format=torch.channels_last).train(kind == "train")
        seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(2):  # interleaved: fp32, bf16, fp32, bf16
            for label in ("fp32", "bf16"):
                bf16 = label == "bf16"
                fn = _train_step(model, batch, side, bf16) if kind == "train" else _forward(model, side, bf16)
                seconds[label].append(_seconds(fn, repeats if kind == "train" else 1))
        fp32, bf16 = statistics.median(seconds["fp32"]), statistics.median(seconds["bf16"])
        rows.append({"network": name, "what": kind, "batch": batch, "side": side, "fp32_s": fp32, "bf16_s": bf16,
                     "bf16_speedup": fp32 / bf16})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--speed", action="store_true", help="time fp32 against bf16 instead")
    parser.add_argument("--weights", type=Path, default=None, help="a published network for --speed")
    args = parser.parse_args()
    print(machine(torch.device("cpu")))
    if args.speed:
        rows = speed(args.weights, min(args.repeats, 5))
        print(table(rows, ["network", "what", "batch", "side", "fp32_s", "bf16_s", "bf16_speedup"]))
        return
    rows = [check(case, dtype, args.repeats) for case in CASES for dtype in (torch.bfloat16, torch.float32)]
    print(table(rows, ["case", "dtype", "threads", "repeats", "not_finite", "differs"]))


if __name__ == "__main__":
    main()
