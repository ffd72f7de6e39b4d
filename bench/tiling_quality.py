"""Tiling and ensemble quality: PSNR of every tile/stride/blend/margin setting against whole-image
inference, the gain of 2-, 4- and 8-way self-ensembles, and the cost of the device's default
settings (``infer``'s defaults at this geometry: 8 ways, hann, ``precision=auto``, auto batch,
``compile=auto``) against the same settings in fp32, on held-out images with a trained model.
On CUDA ``auto`` is bf16 (issue 8's target: within 0.01 dB of fp32); on a CPU without native bf16
it is fp32, so the script also runs the defaults with bf16 forced (``--mixed on``, slow there).

Everything goes through ``pipeline.inference.predict.predict_images`` (what ``infer`` runs). Held-out images:
the dataset's test set when its ground truth is in ``test_hr/`` (the demo's), and the validation
fold of ``splits.csv``. PSNR is the contest's (RGB, uint8-rounded, per image, then the mean);
differences are paired per image and reported to 0.001 dB. The default geometry is the demo's
(LR 128, tiles 32 / stride 16 = the reference's 49 tiles of 128/64 on 512, divided by 4).

    python -m pipeline demo-data --out /tmp/bench_demo && python -m pipeline prepare --data /tmp/bench_demo
    python -m pipeline patchify --data /tmp/bench_demo --config configs/demo.yaml
    python -m pipeline train --config configs/demo.yaml --data /tmp/bench_demo paths.models=/tmp/bench_models \\
        run=bench train.max_minutes=5
    python -m bench.tiling_quality --checkpoint /tmp/bench_models/bench/best.pth --data /tmp/bench_demo
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import RESULTS, machine, measure, pick, psnr, table, write_csv
from pipeline.core.images import read_float
from pipeline.core.layout import DataLayout
from pipeline.core.runtime import autocast_dtype, precision_name
from pipeline.inference.predict import Settings, predict_images
from pipeline.models.checkpoint import model_from_checkpoint

# (label, settings) at the demo geometry; {t}/{s} are the reference tile and stride (LR pixels).
TILINGS = (
    ("whole image", dict(tile=0)),
    ("whole image pad {q}", dict(tile=0, pad="q")),
    ("{t}/{s} mean (reference)", dict()),
    ("{t}/{s} hann", dict(tile_blend="hann")),
    ("{t}/{s} mean margin {q}", dict(margin="q")),
    ("{t}/{s} mean margin {h}", dict(margin="h")),
    ("{t}/{s} hann margin {q}", dict(tile_blend="hann", margin="q")),
    ("{t}/{s} mean pad {q}", dict(pad="q")),
    ("{t}/{s} hann pad {q} margin {q}", dict(tile_blend="hann", pad="q", margin="q")),
    ("{t}/{s3} mean (1/4 overlap)", dict(stride="s3")),
    ("{t}/{s3} hann (1/4 overlap)", dict(tile_blend="hann", stride="s3")),
    ("{t2}/{t} mean", dict(tile="t2", stride="t")),
    ("{t2}/{t} hann", dict(tile_blend="hann", tile="t2", stride="t")),
    ("{t2}/{t} hann margin {h}", dict(tile_blend="hann", tile="t2", stride="t", margin="h")),
)


class Autocast(nn.Module):
    """``model`` under autocast to ``dtype`` on any device: how fp16 numerics are checked on a CPU
    (pipeline.core.runtime refuses fp16 there because it is slow, not because it is wrong)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


def held_out(data: Path, fold: int, splits: list[str]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(split, id, lr, hr) float images of the test set with test_hr/ ground truth and of the validation fold."""
    out = []
    if "test" in splits:
        for img_id, lr_path in DataLayout(data).test_items():
            hr_path = data / "test_hr" / Path(lr_path).name
            if hr_path.is_file():
                out.append(("test", img_id, read_float(lr_path), read_float(hr_path)))
    if "val" in splits:
        out += [("val", p.name, read_float(p.lr_path), read_float(p.hr_path))
                for p in DataLayout(data).validation_pairs(fold)]
    if not out:
        raise SystemExit(f"{data}: no held-out images with ground truth (test_hr/ or splits.csv fold {fold})")
    return out


def grid(tile: int, stride: int) -> list[tuple[str, Settings]]:
    names = {"t": tile, "s": stride, "s3": tile - (tile - stride) // 2, "t2": 2 * tile,
             "q": (tile - stride) // 4, "h": (tile - stride) // 2}
    out = []
    for label, over in TILINGS:
        kw = {"tile": tile, "stride": stride, **{k: names.get(v, v) if isinstance(v, str) and k != "tile_blend" else v
                                                 for k, v in over.items()}}
        out.append((label.format(**names), Settings(tta=1, precision="fp32", **kw)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("/tmp/bench_models/bench/best.pth"))
    p.add_argument("--weights", choices=("ema", "params"), default="ema")
    p.add_argument("--data", type=Path, default=Path("/tmp/bench_demo"))
    p.add_argument("--fold", type=int, default=0, help="validation fold (data.val_fold)")
    p.add_argument("--splits", default="test,val", help="held-out sets: test (needs test_hr/), val")
    p.add_argument("--tile", type=int, default=32, help="reference tile (LR px): 32 on the demo, 128 on the contest")
    p.add_argument("--stride", type=int, default=16, help="reference stride (LR px)")
    p.add_argument("--mixed", choices=("on", "off"), default="on",
                   help="also measure bf16 and fp16 autocast's PSNR cost (slow without AMX, but the numbers hold)")
    p.add_argument("--device", default="auto")
    p.add_argument("--csv", type=Path, default=RESULTS / "tiling_quality.csv")
    args = p.parse_args()
    device = pick(args.device)
    if not args.checkpoint.is_file():
        raise SystemExit(f"{args.checkpoint}: checkpoint not found; train one first (see --help)")
    model, meta = model_from_checkpoint(args.checkpoint, args.weights == "ema")
    items = held_out(args.data, args.fold, args.splits.split(","))
    lrs, hrs = [it[2] for it in items], [it[3] for it in items]
    info = machine(device)
    print(f"{info}\n{meta.get('arch')} from {args.checkpoint} ({args.weights}); {len(items)} held-out images "
          f"({', '.join(sorted({it[0] for it in items}))}), LR {lrs[0].shape[1]}x{lrs[0].shape[0]}", flush=True)

    configs = grid(args.tile, args.stride)
    ref_label = f"{args.tile}/{args.stride} mean (reference)"
    ref = dict(configs)[ref_label]
    for ways in (2, 4, 8):
        configs.append((f"whole image, {ways}-way ensemble", Settings(tta=ways, tile=0, precision="fp32")))
        configs.append((f"{args.tile}/{args.stride} mean, {ways}-way ensemble", Settings(**{**ref.__dict__,
                                                                                             "tta": ways})))
    if args.mixed != "off":
        for label, s in (("whole image bf16", Settings(tta=1, tile=0, precision="bf16")),
                         (f"{args.tile}/{args.stride} mean bf16", Settings(**{**ref.__dict__, "precision": "bf16"}))):
            configs.append((label, s))
        configs.append(("whole image fp16", Settings(tta=1, tile=0, precision="fp32")))
    default = Settings(tile=args.tile, stride=args.stride)  # infer's defaults at this geometry
    auto = precision_name(autocast_dtype(device, "auto"))
    configs.append((f"default settings ({auto})", default))
    configs.append(("default settings, fp32", dataclasses.replace(default, precision="fp32", compile="off")))
    if args.mixed != "off" and auto == "fp32":
        configs.append(("default settings, bf16", dataclasses.replace(default, precision="bf16", compile="off")))

    scores: dict[str, np.ndarray] = {}
    rows = []
    for label, s in configs:
        net = Autocast(model, torch.float16) if "fp16" in label else model
        with measure(device) as m:
            srs, _timing = predict_images([net], lrs, s, device)
        scores[label] = np.array([psnr(sr, hr) for sr, hr in zip(srs, hrs)])
        print(f"  {label}: {scores[label].mean():.4f} dB ({m['seconds']:.1f} s)", flush=True)
        rows.append({"setting": label, "label": s.label(), "seconds": m["seconds"]})
    whole, tiled = scores["whole image"], scores[ref_label]
    for r in rows:
        sc = scores[r["setting"]]
        r.update({"psnr_db": round(float(sc.mean()), 4),
                  "vs_whole_db": round(float((sc - whole).mean()), 4),
                  "vs_reference_db": round(float((sc - tiled).mean()), 4),
                  "min_vs_whole_db": round(float((sc - whole).min()), 4),
                  "max_vs_whole_db": round(float((sc - whole).max()), 4),
                  "images": len(sc)})
    for split in sorted({it[0] for it in items}):
        idx = [i for i, it in enumerate(items) if it[0] == split]
        for r in rows:
            r[f"{split}_psnr_db"] = round(float(scores[r["setting"]][idx].mean()), 4)
    for r in rows:
        r["machine"] = info
        r["checkpoint"] = str(args.checkpoint)
    path = write_csv(rows, args.csv)
    print(f"\nwrote {path}\n{info}\n{meta.get('arch')} ({args.weights} weights); contest PSNR mean over "
          f"{len(items)} held-out images; vs_* = mean paired per-image difference in dB")
    cols = ["setting", "psnr_db", "vs_whole_db", "vs_reference_db", "min_vs_whole_db", "max_vs_whole_db"]
    cols += [c for c in rows[0] if c.endswith("_psnr_db") and c != "psnr_db"]
    print(table([{**r, **{c: f"{r[c]:+.3f}" if c.startswith(("vs", "min", "max")) else f"{r[c]:.3f}"
                          for c in cols[1:]}} for r in rows], cols))
    fp32 = scores["default settings, fp32"]
    for label in (f"default settings ({auto})", "default settings, bf16"):
        if label in scores and label != "default settings (fp32)":
            d = scores[label] - fp32
            verdict = "met" if abs(d.mean()) <= 0.01 else "NOT met"
            print(f"{label} vs fp32: {d.mean():+.4f} dB (per image {d.min():+.4f} .. {d.max():+.4f}); "
                  f"target within 0.01 dB: {verdict}")


if __name__ == "__main__":
    main()
