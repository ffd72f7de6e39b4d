"""Inference speed: our batched tiler + batched self-ensemble against the reference team's loop.

The reference (written here, as a faithful baseline): for each of the tiles, for each of the
dihedral transforms, forward ONE (1,3,t,t) fp32 NCHW tensor, invert, move the output to the host,
average the ways, paste the tile with equal weights. Our variants go through
``pipeline.predict.predict_images`` (the code ``infer`` runs): tiles in batches, all ways of a
batch in one forward, channels_last, optional autocast and torch.compile; plus whole-image
inference. Every variant is timed on the same images in one process, interleaved, and its output
compared (contest PSNR, uint8) with the reference's fp32 output, so speed never hides a quality loss.

A case is ``model:lr:tile/stride:ways``. The GPU default is the contest geometry (512 LR, 49 tiles
of 128, 8 ways) with the full models; on the CPU full models at 512 would take tens of minutes
per image, so the CPU default uses the tiny presets on the demo geometry (128 LR, 49 tiles of 32,
8 ways) for edsr-tiny, 64 LR (9 tiles of 32, 8 ways) for the other tiny presets and 64 LR with 2 ways
for the full presets. torch.compile is off by default on the CPU (minutes of compilation on 2
cores, no gain measured); --compile tiny times it. The table says which case ran.

    python -m bench.infer_speed                       # CPU: ~10 min; GPU: the contest geometry
    python -m bench.infer_speed --cases rrdb:512:128/64:8 --images 2 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import RESULTS, interleaved, machine, measure, median, pick, psnr, table, write_csv
from pipeline.models import build_model
from pipeline.predict import Settings, predict_images
from pipeline.runtime import autocast_dtype, cpu_has_fast_bf16
from pipeline.tiling import auto_batch

CPU_CASES = ("edsr-tiny:128:32/16:8", "rrdb-tiny:64:32/16:8", "swinir-tiny:64:32/16:8",
             "edsr:64:32/16:2", "rrdb:64:32/16:2", "swinir:64:32/16:2")
GPU_CASES = ("rrdb:512:128/64:8", "edsr:512:128/64:8", "swinir:512:128/64:8")

# The reference's 8 transforms as (quarter turns, then flip the width axis): the first 2 / 4 are
# the same sets as pipeline.ensemble's first 2 / 4 (identity + h-flip; all flips), so the outputs
# of equal ways are comparable.
REF_WAYS = ((0, False), (0, True), (2, True), (2, False), (1, False), (1, True), (3, False), (3, True))


@dataclass(frozen=True)
class Case:
    model: str
    lr: int
    tile: int
    stride: int
    ways: int

    @classmethod
    def parse(cls, text: str) -> Case:
        try:
            model, lr, tiles, ways = text.split(":")
            tile, stride = tiles.split("/")
            return cls(model, int(lr), int(tile), int(stride), int(ways))
        except ValueError:
            raise SystemExit(f"bad case {text!r}: expected model:lr:tile/stride:ways, e.g. rrdb:512:128/64:8") from None

    def label(self) -> str:
        return f"{self.model} {self.lr}px {self.tile}/{self.stride} x{self.ways}"


def starts(n: int, tile: int, stride: int) -> list[int]:
    s = list(range(0, n - tile + 1, stride))
    return s if s[-1] == n - tile else [*s, n - tile]


@torch.inference_mode()
def reference_loop(model: nn.Module, lr: np.ndarray, tile: int, stride: int, ways: int,
                   device: torch.device) -> np.ndarray:
    """The reference team's inference: one tile, one way per forward, fp32, host-side merge."""
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float()  # (H,W,3) -> (1,3,H,W) on the host
    h, w = x.shape[-2:]
    out = np.zeros((3, 4 * h, 4 * w), np.float32)
    count = np.zeros((1, 4 * h, 4 * w), np.float32)
    for y in starts(h, tile, stride):
        for c in starts(w, tile, stride):
            acc = np.zeros((3, 4 * tile, 4 * tile), np.float32)
            for turns, flip in REF_WAYS[:ways]:
                t = torch.rot90(x[:, :, y:y + tile, c:c + tile], turns, (-2, -1))
                t = t.flip(-1) if flip else t
                sr = model(t.to(device))  # (1,3,t,t) -> (1,3,4t,4t)
                sr = sr.flip(-1) if flip else sr
                acc += torch.rot90(sr, -turns, (-2, -1))[0].float().cpu().numpy()  # a host round trip per way
            out[:, 4 * y:4 * (y + tile), 4 * c:4 * (c + tile)] += acc / ways
            count[:, 4 * y:4 * (y + tile), 4 * c:4 * (c + tile)] += 1
    return (out / count).transpose(1, 2, 0)  # (3,4H,4W) -> (4H,4W,3)


def test_images(n: int, side: int) -> list[np.ndarray]:
    """``n`` photos bundled with scikit-image, centre-cropped square and area-resized to side x side."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        s = min(img.shape[:2])
        y, x = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
        t = torch.from_numpy(img[y:y + s, x:x + s]).permute(2, 0, 1)[None].float() / 255  # (1,3,s,s)
        t = F.interpolate(t, size=(side, side), mode="area") if s != side else t
        out.append(t[0].permute(1, 2, 0).contiguous().numpy())  # (side,side,3)
    return out


def variants(case: Case, device: torch.device, compile_mode: str, batches: list[str]) -> dict[str, Settings]:
    base = Settings(tta=case.ways, tile=case.tile, stride=case.stride, blend="mean", precision="fp32",
                    channels_last=True, batch=0)
    n = len(starts(case.lr, case.tile, case.stride)) ** 2
    out = {"ours": base, "ours nchw": Settings(**{**base.__dict__, "channels_last": False})}
    for b in batches:
        size = n if b == "all" else int(b)
        if size <= n:
            out[f"ours b{size}"] = Settings(**{**base.__dict__, "batch": size})
    mixed = []
    if device.type == "cuda":
        mixed = ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    elif cpu_has_fast_bf16():
        mixed = ["bf16"]
    for p in mixed:
        out[f"ours {p}"] = Settings(**{**base.__dict__, "precision": p})
    tiny = any(s in case.model for s in ("tiny", "nano"))
    if compile_mode == "all" or (compile_mode == "tiny" and tiny):
        out["ours compile"] = base
    out["whole"] = Settings(**{**base.__dict__, "tile": 0})
    for p in mixed[:1]:
        out[f"whole {p}"] = Settings(**{**base.__dict__, "tile": 0, "precision": p})
    return out


def run_case(case: Case, device: torch.device, images: list[np.ndarray], repeats: int, compile_mode: str,
             batches: list[str]) -> list[dict]:
    torch.manual_seed(0)
    nchw = build_model(case.model).eval().to(device)
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    settings = variants(case, device, compile_mode, batches)
    models = {name: nchw if not s.channels_last else nhwc for name, s in settings.items()}
    compile_s = math.nan
    if "ours compile" in settings:
        models["ours compile"] = torch.compile(copy.deepcopy(nhwc))
    names = ["reference", *settings]
    secs: dict[str, list[float]] = {v: [] for v in names}
    peak: dict[str, float] = dict.fromkeys(names, 0.0)
    outs: dict[str, list[np.ndarray]] = {v: [np.empty(0)] * len(images) for v in names}
    # Warm-up (oneDNN primitive creation, cuDNN autotuning, compilation) on a small image.
    # torch.compile warms up on a real image: every batch shape it will meet compiles then.
    small = test_images(1, case.tile)[0]
    for name in names:
        with measure(device) as m:
            if name == "reference":
                reference_loop(nchw, small, case.tile, case.stride, 1, device)
            else:
                warm = images[0] if name == "ours compile" else small
                predict_images([models[name]], [warm], settings[name], device)
        if name == "ours compile":
            compile_s = m["seconds"]

    def run(name: str, _repeat: int) -> None:
        for i, img in enumerate(images):
            with measure(device) as m:
                if name == "reference":
                    sr = reference_loop(nchw, img, case.tile, case.stride, case.ways, device)
                else:
                    sr = predict_images([models[name]], [img], settings[name], device)[0][0]
            secs[name].append(m["seconds"])
            peak[name] = max(peak[name], m["peak_mib"])
            outs[name][i] = sr
        print(f"  {case.label()} {name}: {secs[name][-1]:.3f} s", flush=True)

    interleaved(names, repeats, run)
    ref_s = median(secs["reference"])
    rows = []
    n_tiles = len(starts(case.lr, case.tile, case.stride)) ** 2
    for name in names:
        s = settings.get(name)
        tiles = 1 if s is not None and s.tile == 0 else n_tiles
        batch = 1 if s is None or s.tile == 0 else (s.batch or auto_batch_of(case, device))
        rows.append({
            "case": case.label(), "variant": name, "tiles": tiles, "ways": case.ways,
            "batch": batch, "precision": "fp32" if s is None else autocast_name(device, s.precision),
            "channels_last": bool(s and s.channels_last),
            "s_per_image": median(secs[name]), "speedup_vs_ref": ref_s / median(secs[name]),
            "peak_mib": peak[name],
            "psnr_vs_ref_db": median([psnr(a, b) for a, b in zip(outs[name], outs["reference"])]),
            "compile_s": compile_s if name == "ours compile" else math.nan,
            "runs": len(secs[name]),
        })
    return rows


def auto_batch_of(case: Case, device: torch.device) -> int | str:
    """The tile batch predict_images picks by itself (on a GPU it is measured: 'auto')."""
    if device.type == "cuda":
        return "auto"
    n = len(starts(case.lr, case.tile, case.stride)) ** 2
    return auto_batch(lambda x: x, 3, (case.tile, case.tile), device, n, ways=case.ways)


def autocast_name(device: torch.device, precision: str) -> str:
    dtype = autocast_dtype(device, precision)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--cases", nargs="+", default=None,
                   help=f"model:lr:tile/stride:ways (default CPU: {' '.join(CPU_CASES)}; GPU: {' '.join(GPU_CASES)})")
    p.add_argument("--images", type=int, default=1, help="test photos per case")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds over all variants")
    p.add_argument("--batches", default="1,4,all", help="extra tile batch sizes to time ('all' = every tile)")
    p.add_argument("--compile", choices=("none", "tiny", "all"), default=None,
                   help="torch.compile for: no model, tiny/nano presets, all (default: none on CPU, all on CUDA)")
    p.add_argument("--csv", type=Path, default=None, help="default bench/results/infer_speed_<device>.csv")
    args = p.parse_args()
    device = pick(args.device)
    cases = [Case.parse(c) for c in (args.cases or (GPU_CASES if device.type == "cuda" else CPU_CASES))]
    compile_mode = args.compile or ("all" if device.type == "cuda" else "none")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = machine(device)
    print(info, flush=True)
    rows = []
    for case in cases:
        imgs = test_images(args.images, case.lr)
        rows += run_case(case, device, imgs, args.repeats, compile_mode, args.batches.split(","))
    for r in rows:
        r["machine"] = info
    path = write_csv(rows, args.csv or RESULTS / f"infer_speed_{device.type}.csv")
    cols = ["case", "variant", "tiles", "ways", "batch", "precision", "channels_last", "s_per_image",
            "speedup_vs_ref", "peak_mib", "psnr_vs_ref_db", "compile_s"]
    print(f"\nwrote {path}\n{info}\nseconds per image are medians over {args.images} image(s) x {args.repeats} "
          "round(s); psnr_vs_ref_db: contest PSNR of the output against the reference loop's fp32 output")
    print(table(rows, cols))


if __name__ == "__main__":
    main()
