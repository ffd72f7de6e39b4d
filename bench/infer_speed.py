"""Inference speed: our batched tiler + batched self-ensemble against the reference team's loop,
with the FLOPs of each image and the share of the device's peak they reach.

The reference (written here, as a faithful baseline): for each of the tiles, for each of the
dihedral transforms, forward ONE (1,3,t,t) fp32 NCHW tensor, invert, move the output to the host,
average the ways, paste the tile with equal weights. Our variants go through
``pipeline.inference.predict.predict_images`` (the code ``infer`` runs):

- ``ours``: the defaults (tile batch sized to the device, ``precision=auto``, channels_last,
  ``compile=auto`` decided for ``--auto-images`` images, 18 = the contest's test set; the
  ``compile`` column says what it chose), ``--blend`` merge weights (default mean, the reference's,
  so outputs compare; hann costs the same: the weights are built once per geometry);
- ``ours eager`` (only when auto chose to compile), ``ours compile`` (``compile=default``) and
  ``ours compile ro`` (``reduce-overhead``: CUDA graphs; CUDA only), per ``--compile``;
- ``ours fp32`` (where auto is not fp32), ``ours nchw``, ``ours bN`` (N tiles per forward);
- ``whole`` / ``whole bf16``: the whole image in one forward per way (``tile=0``).

Every variant is timed on the same images in one process, interleaved, and its output compared
(contest PSNR, uint8) with the reference's fp32 output, so speed never hides a quality loss.
Seconds are per image, without compilation (reported apart as ``compile_s``: compile + warm-up).
FLOPs are counted once per case (``bench.flops``: convolutions, matrix products, attention) as
tiles x ways x one tile's forward (or ways x the whole image's), the useful work every variant
does; ``tflops`` = FLOPs / seconds, ``pct_*_peak`` = its share of the datasheet and the measured
(large bf16 matrix product) peaks.

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
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import RESULTS, interleaved, machine, measure, median, pick, psnr, table, write_csv
from bench.flops import count_flops, peak_tflops, utilisation
from pipeline.core.runtime import autocast_dtype, cpu_has_fast_bf16
from pipeline.inference.predict import Settings, compile_choice, predict_images
from pipeline.models.table import build_model

CPU_CASES = ("edsr-tiny:128:32/16:8", "rrdb-tiny:64:32/16:8", "swinir-tiny:64:32/16:8",
             "edsr:64:32/16:2", "rrdb:64:32/16:2", "swinir:64:32/16:2")
GPU_CASES = ("rrdb:512:128/64:8", "edsr:512:128/64:8", "swinir:512:128/64:8")

# The reference's 8 transforms as (quarter turns, then flip the width axis): the first 2 / 4 are
# the same sets as pipeline.inference.ensemble's first 2 / 4 (identity + h-flip; all flips), so the outputs
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


def mixed_precisions(device: torch.device) -> list[str]:
    """The low precisions worth timing here: bf16 (or fp16) on CUDA, bf16 on CPUs with native bf16."""
    if device.type == "cuda":
        return ["bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    return ["bf16"] if cpu_has_fast_bf16() else []


def variants(case: Case, device: torch.device, compile_mode: str, batches: list[str], blend: str,
             auto_images: int) -> dict[str, Settings]:
    base = Settings(tta=case.ways, tile=case.tile, stride=case.stride, tile_blend=blend)  # the defaults
    n = len(starts(case.lr, case.tile, case.stride)) ** 2
    out = {"ours": base}
    if auto_compile(case, device, auto_images) != "off":
        out["ours eager"] = dataclasses.replace(base, compile="off")
    tiny = any(s in case.model for s in ("tiny", "nano"))
    if compile_mode == "all" or (compile_mode == "tiny" and tiny):
        out["ours compile"] = dataclasses.replace(base, compile="default")
        if device.type == "cuda":
            out["ours compile ro"] = dataclasses.replace(base, compile="reduce-overhead")
    eager = dataclasses.replace(base, compile="off")
    if autocast_dtype(device, "auto") is not None:
        out["ours fp32"] = dataclasses.replace(eager, precision="fp32")
    out["ours nchw"] = dataclasses.replace(eager, channels_last=False)
    for b in batches:
        size = n if b == "all" else int(b)
        if size <= n:
            out[f"ours b{size}"] = dataclasses.replace(eager, batch=size)
    out["whole"] = dataclasses.replace(eager, tile=0, precision="fp32")
    for p in mixed_precisions(device):
        out[f"whole {p}"] = dataclasses.replace(eager, tile=0, precision=p)
    return out


def auto_compile(case: Case, device: torch.device, images: int) -> str:
    """What ``compile=auto`` picks for ``images`` images of this case."""
    tiles = len(starts(case.lr, case.tile, case.stride)) ** 2
    return compile_choice("auto", device, images * tiles * case.ways * case.tile**2)


def flops_per_image(model: nn.Module, case: Case, device: torch.device) -> tuple[int, int]:
    """(tiled, whole-image) FLOPs of one image: tiles x ways x one tile, ways x one whole image."""
    with torch.inference_mode():
        tile = count_flops(model, torch.zeros(1, 3, case.tile, case.tile, device=device))
        whole = count_flops(model, torch.zeros(1, 3, case.lr, case.lr, device=device))
    tiles = len(starts(case.lr, case.tile, case.stride)) ** 2
    return tiles * case.ways * tile, case.ways * whole


def run_case(case: Case, device: torch.device, images: list[np.ndarray], repeats: int, compile_mode: str,
             batches: list[str], blend: str, auto_images: int) -> list[dict]:
    torch.manual_seed(0)
    nchw = build_model(case.model).eval().to(device)
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    settings = variants(case, device, compile_mode, batches, blend, auto_images)
    models = {name: nchw if not s.channels_last else nhwc for name, s in settings.items()}
    names = ["reference", *settings]
    secs: dict[str, list[float]] = {v: [] for v in names}
    peak: dict[str, float] = dict.fromkeys(names, 0.0)
    outs: dict[str, list[np.ndarray]] = {v: [np.empty(0)] * len(images) for v in names}
    info: dict[str, dict] = {}
    # Warm-up (oneDNN primitive creation, cuDNN autotuning) on a small image; compiled variants
    # warm up on a real image inside predict_images (every shape they will meet compiles then).
    small = test_images(1, case.tile)[0]
    for name in names:
        if name == "reference":
            reference_loop(nchw, small, case.tile, case.stride, 1, device)
            continue
        s = settings[name]
        warm = images[0] if s.compile != "off" or name == "ours" else small
        _out, timing = predict_images([models[name]], [warm], s, device, total_images=auto_images)
        info[name] = {"batch": timing.batch, "precision": timing.precision, "compile": timing.compile,
                      "compile_s": timing.compile_seconds if timing.compile != "off" else math.nan}

    def run(name: str, _repeat: int) -> None:
        for i, img in enumerate(images):
            with measure(device) as m:
                if name == "reference":
                    sr = reference_loop(nchw, img, case.tile, case.stride, case.ways, device)
                    seconds = None
                else:
                    (sr,), timing = predict_images([models[name]], [img], settings[name], device,
                                                   total_images=auto_images)
                    seconds = timing.seconds  # the image's work, without the compiled variants' warm-up run
                    info[name].update(batch=timing.batch, precision=timing.precision)
            secs[name].append(m["seconds"] if seconds is None else seconds)
            peak[name] = max(peak[name], m["peak_mib"])
            outs[name][i] = sr
        print(f"  {case.label()} {name}: {secs[name][-1]:.3f} s", flush=True)

    interleaved(names, repeats, run)
    ref_s = median(secs["reference"])
    tiled_flops, whole_flops = flops_per_image(nchw, case, device)
    peaks = peak_tflops(device)
    rows = []
    n_tiles = len(starts(case.lr, case.tile, case.stride)) ** 2
    for name in names:
        s = settings.get(name)
        whole = s is not None and s.tile == 0
        flops = whole_flops if whole else tiled_flops
        row = info.get(name, {"batch": 1, "precision": "fp32", "compile": "off", "compile_s": math.nan})
        rows.append({
            "case": case.label(), "variant": name, "tiles": 1 if whole else n_tiles, "ways": case.ways,
            "batch": row["batch"], "precision": row["precision"], "compile": row["compile"],
            "channels_last": bool(s and s.channels_last),
            "s_per_image": median(secs[name]), "speedup_vs_ref": ref_s / median(secs[name]),
            "peak_mib": peak[name],
            "psnr_vs_ref_db": median([psnr(a, b) for a, b in zip(outs[name], outs["reference"])]),
            "compile_s": row["compile_s"], "runs": len(secs[name]),
            "gflop_per_image": flops / 1e9, **utilisation(flops, median(secs[name]), peaks),
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--cases", nargs="+", default=None,
                   help=f"model:lr:tile/stride:ways (default CPU: {' '.join(CPU_CASES)}; GPU: {' '.join(GPU_CASES)})")
    p.add_argument("--images", type=int, default=1, help="test photos per case")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds over all variants")
    p.add_argument("--batches", default=None,
                   help="extra tile batch sizes to time, 'all' = every tile (default: 1,4,all on CPU, 1 on CUDA)")
    p.add_argument("--compile", choices=("none", "tiny", "all"), default=None,
                   help="add compile=default (and reduce-overhead on CUDA) variants for: no model, tiny/nano "
                        "presets, all (default: none on CPU, all on CUDA)")
    p.add_argument("--auto-images", type=int, default=18,
                   help="images compile=auto decides for (default 18: the contest's test set)")
    p.add_argument("--blend", choices=("mean", "hann"), default="mean",
                   help="merge weights of our variants (mean = the reference's, so outputs compare)")
    p.add_argument("--csv", type=Path, default=None, help="default bench/results/infer_speed_<device>.csv")
    args = p.parse_args()
    device = pick(args.device)
    cases = [Case.parse(c) for c in (args.cases or (GPU_CASES if device.type == "cuda" else CPU_CASES))]
    compile_mode = args.compile or ("all" if device.type == "cuda" else "none")
    batches = (args.batches or ("1" if device.type == "cuda" else "1,4,all")).split(",")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = machine(device)
    print(info, flush=True)
    rows = []
    for case in cases:
        imgs = test_images(args.images, case.lr)
        rows += run_case(case, device, imgs, args.repeats, compile_mode, batches, args.blend, args.auto_images)
    for r in rows:
        r["machine"] = info
    path = write_csv(rows, args.csv or RESULTS / f"infer_speed_{device.type}.csv")
    cols = ["case", "variant", "batch", "precision", "compile", "channels_last", "s_per_image", "speedup_vs_ref",
            "peak_mib", "psnr_vs_ref_db", "compile_s", "gflop_per_image", "tflops", "pct_datasheet_peak",
            "pct_measured_peak"]
    peaks = peak_tflops(device)
    print(f"\nwrote {path}\n{info}\nseconds per image are medians over {args.images} image(s) x {args.repeats} "
          "round(s), compile excluded; psnr_vs_ref_db: contest PSNR of the output against the reference loop's fp32 "
          f"output; peaks: datasheet {peaks['datasheet'] or '-'} / measured {peaks['measured']:.3g} TFLOP/s; "
          f"compile=auto decides for {args.auto_images} images")
    print(table(rows, cols))


if __name__ == "__main__":
    main()
