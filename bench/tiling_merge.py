"""Merge cost of the tiler: a base ``tiling.py`` (a file) against the working tree's, and on volumes.

    git show 5bdb879:pipeline/inference/tiling.py > /tmp/base_tiling.py
    python -m bench.tiling_merge --base /tmp/base_tiling.py [--rounds 10]

Images: BENCHMARKS.md section 7's case (512 LR, 49 tiles of 128/64, hann, batch 4, a nearly free
nearest x4 "model", so only cutting, weighting and merging are timed), the two tilers called in
alternating order each round: the first call of a round pays for allocating the 2048^2 output
(the same file measured 3.2 s first and 1.9 s second in one process), which a fixed order books
to one side. Prints the largest output difference and the median seconds of each.
Equivalence: both tilers on 768 image cases (4 sizes x 8 tile/stride/margin x 2 blends x 3 pads x
2 batches x fixed batch or not, a convolution + nearest x4 model): outputs bit for bit, reports,
and the text of every error must agree; prints the number of mismatches.
Volumes: a 128^3 volume through an identity, 27 tiles of 64^3 (stride 48 and 32), hann.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import pipeline.inference.tiling as new


def _load(path: str) -> object:
    spec = importlib.util.spec_from_file_location("base_tiling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["base_tiling"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def images(base: object, rounds: int) -> None:
    lr = torch.rand(3, 512, 512)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=4, mode="nearest")  # (N,3,h,w) -> (N,3,4h,4w)

    times: dict[str, list[float]] = {"base": [], "new": []}
    with torch.inference_mode():
        diff = base.tile_forward(fn, lr, 128, 64, "hann", batch=4) - new.tile_forward(fn, lr, 128, 64, "hann", batch=4)
        print(f"images: max abs difference base vs new {float(diff.abs().max())}")
        for r in range(rounds):
            order = [("base", base), ("new", new)] if r % 2 == 0 else [("new", new), ("base", base)]
            for name, module in order:
                start = time.perf_counter()
                module.tile_forward(fn, lr, 128, 64, "hann", batch=4)
                times[name].append(time.perf_counter() - start)
    print("images: median seconds per 512 LR image " + ", ".join(
        f"{k} {statistics.median(v):.3f}" for k, v in times.items()))


def equivalence(base: object) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(conv(x), scale_factor=4, mode="nearest")  # (N,3,h,w) -> (N,3,4h,4w)

    def run(module: object, *args: object) -> tuple:
        try:
            out, rep = module.run_tiles(fn, *args)
            return out, (rep.tiles, rep.batch, tuple(rep.tile_shape))
        except Exception as exc:  # the same error, word for word, is part of the behaviour
            return None, (type(exc).__name__, str(exc))

    cases = list(itertools.product(
        [(37, 53), (20, 90), (12, 30), (64, 64)],
        [(16, 8, 2), (16, 10, 3), (32, 20, 6), (0, 0, 0), (128, 64, 4), (16, 16, 0), (16, 8, 5), (16, 20, 0)],
        ["mean", "hann"], [0, 3, 25], [0, 3], [False, True]))
    bad = 0
    with torch.no_grad():
        for size, (tile, stride, margin), blend, pad, batch, fixed in cases:
            lr = torch.rand(3, *size)
            (a, ra), (b, rb) = (run(m, lr, tile, stride, blend, batch, pad, margin, fixed) for m in (base, new))
            same = ra == rb and (a is None) == (b is None) and (a is None or torch.equal(a, b))
            bad += not same
    print(f"images: {len(cases)} cases, {bad} mismatches (outputs bit for bit, reports, error texts)")


def volumes(rounds: int) -> None:
    vol = torch.rand(1, 1, 128, 128, 128)
    with torch.inference_mode():
        for stride in (48, 32):
            seconds = []
            for _ in range(rounds):
                start = time.perf_counter()
                out, report = new.run_tiles(lambda x: x * 1.0, vol, (64, 64, 64), stride, "hann", batch=4)
                seconds.append(time.perf_counter() - start)
            print(f"volumes: 128^3, {report.tiles} tiles of 64^3 stride {stride}: "
                  f"{statistics.median(seconds):.3f} s (max error {float((out - vol).abs().max()):.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True,
                        help="a tiling.py to compare with (git show REV:pipeline/inference/tiling.py)")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    base = _load(args.base)
    equivalence(base)
    images(base, args.rounds)
    volumes(3)


if __name__ == "__main__":
    main()
