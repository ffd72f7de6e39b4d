"""``infer.tile=auto`` at the contest's geometry: what it chooses, seconds per image and peak memory, beside
the whole image and fixed tiles, for a published network on 512^2 LR images (2048^2 outputs).

Each row runs in a fresh process (``--one``), so its peak resident memory (CPU) or allocator peak
(CUDA) is its own; ``seconds`` is the median image after the first (``first_s``: one-off kernel
set-up). Rows: ``auto`` (the rule), ``whole`` (tile 0; the ensemble's ways in calls of
``images_per_call``), ``whole, 8 ways in one call`` (the rule before: one batch of 8 images),
``176/88`` (what the old fixed CPU budget chose for 512^2 x 8 ways), ``128/64`` (the reference team's
49 tiles); each at x1 and x8. The output of every row is compared with the whole image's (PSNR).

    python -m bench.tile_auto --weights ../shared/weights/craft_x4_ntire2024_team34.pth --images 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import machine, psnr, table

ROWS = {  # name -> (infer.tile, infer.stride, ways per call: 0 = the rule, -1 = all ways in one call)
    "whole": (0, 0, 0),  # first: the reference of the other rows
    "auto": ("auto", 0, 0),
    "whole, 8 ways in one call": (0, 0, -1),
    "176/88": (176, 88, 0),
    "128/64": (128, 64, 0),
}


def _images(n: int, side: int) -> list[np.ndarray]:
    """``n`` LR crops of bundled photos, (side,side,3) float in [0,1] (the contest-like set's held-out photos)."""
    from pipeline.core.compat import imresize
    from pipeline.core.images import read_uint8
    from pipeline.demo_data import Source, _source_path

    out = []
    for name in ("astronaut.png", "motorcycle_left.png", "camera.png")[:n]:
        photo = read_uint8(_source_path(Source(name, "skimage", (1, 1), "test")))
        photo = np.repeat(photo[:, :, None], 3, axis=2) if photo.ndim == 2 else photo[:, :, :3]
        big = imresize(photo.astype(np.float64) / 255, 4 * side / min(photo.shape[:2]))[:4 * side, :4 * side]
        out.append(imresize(big, 0.25).clip(0, 1).astype(np.float32))  # (side,side,3): MATLAB bicubic x1/4
    return out


def one(weights: Path, row: str, tta: int, n: int, side: int, out: Path) -> None:
    """One row in this process: predict, then write its seconds, peak and outputs to ``out``."""
    import pipeline.inference.predict as predict
    from pipeline.core.config import load_config
    from pipeline.core.heap import keep_freed_memory
    from pipeline.core.runtime import pick_device
    from pipeline.inference.ensemble import average_models

    keep_freed_memory()  # as every stage does (pipeline.cli)
    tile, stride, per_call = ROWS[row]
    if per_call == -1:  # the rule before: every way of a shape in one call
        predict.average_models = lambda fns, x, ways, merge, _per_call: average_models(fns, x, ways, merge)
    cut = [f"infer.tile={tile}"] + ([f"infer.stride={stride}"] if stride else [])
    cfg = load_config(None, [f"model.weights={weights}", *cut, f"infer.tta={tta}"])
    models, _ = predict.load_models(cfg)
    settings = predict.Settings.from_config(cfg.infer)
    device = pick_device()
    outputs, seconds, peak = [], [], 0.0
    for image in _images(n, side):  # one at a time: the first carries the kernels' one-off set-up
        start = time.perf_counter()
        (sr,), timing = predict.predict_images(models, [image], settings, device)
        seconds.append(time.perf_counter() - start)
        outputs.append(sr)
        peak = max(peak, timing.peak_mib)
    summary = timing.summary()
    chosen = summary.get("windows", [{}])[0]
    np.save(out.with_suffix(".npy"), np.stack(outputs))
    out.write_text(json.dumps({"first_s": seconds[0], "seconds": float(np.median(seconds[1:] or seconds)),
                               "peak_mib": peak, "precision": summary["precision"],
                               "chosen": "+".join(chosen.get("tiles", [])) or str(tile),
                               "why": "; ".join(chosen.get("auto", []))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--images", type=int, default=2, help="512^2 LR images per row (at most 3)")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--tta", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--out", type=Path, default=Path("/tmp/tile_auto"))
    parser.add_argument("--one", nargs=3, metavar=("ROW", "TTA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.weights, args.one[0], int(args.one[1]), args.images, args.side, Path(args.one[2]))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    print(machine(torch.device("cuda" if torch.cuda.is_available() else "cpu")), flush=True)
    rows = []
    for tta in args.tta:
        reference = None
        for row in args.rows:
            out = args.out / f"{row.replace(' ', '_').replace('/', '-').replace(',', '')}-x{tta}.json"
            subprocess.run([sys.executable, "-m", "bench.tile_auto", "--weights", str(args.weights), "--images",
                            str(args.images), "--side", str(args.side), "--one", row, str(tta), str(out)], check=True)
            result = json.loads(out.read_text())
            images = np.load(out.with_suffix(".npy"))
            if row == "whole":
                reference = images
            result.update(row=row, tta=tta, vs_whole_db=psnr(images, reference) if reference is not None else "")
            rows.append(result)
            print(result, flush=True)
    print(table(rows, ["row", "tta", "chosen", "first_s", "seconds", "peak_mib", "precision", "vs_whole_db"]))
    for r in rows:
        if r["why"]:
            print(f"{r['row']} x{r['tta']}: {r['why']}")


if __name__ == "__main__":
    main()
