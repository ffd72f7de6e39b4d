"""Are this CPU's bf16 kernels sound? The gradients the project's networks need, repeated on fixed inputs.

Each case runs one convolution's forward and backward ``--repeats`` times on the same tensors and counts
the repeats whose weight gradient is not finite or differs from the first finite one (a sound kernel
gives 0 and 0 on every repeat: the same inputs, the same arithmetic). The cases are the shapes the
networks meet: a 3-D convolution over a 2-voxel side (the 3-D critic's last layers on 16^3 patches),
larger 3-D sides, and the 2-D convolutions of the image networks. The precision policy
(``pipeline.core.runtime.BF16_UNSTABLE``) keeps a kind of run in fp32 where a case fails.

    python -m bench.precision                 # ~1 min on 2 cores; the machine line names the CPU's bf16 kind
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(machine(torch.device("cpu")))
    rows = [check(case, dtype, args.repeats) for case in CASES for dtype in (torch.bfloat16, torch.float32)]
    print(table(rows, ["case", "dtype", "threads", "repeats", "not_finite", "differs"]))


if __name__ == "__main__":
    main()
