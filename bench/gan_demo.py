"""GAN fine-tuning on the demo data: a PSNR run, then fine-tunes of it, scored on the held-out test photos.

The stages as a user runs them (configs/demo.yaml geometry: LR 128 -> HR 512, patches of 128 HR,
random 16-px LR crops): ``prepare`` and ``patchify``; ``train`` of ``--model`` for ``--psnr-minutes``
(the PSNR objective); for each ``--gan`` recipe ``NAME:key=value,...`` a fresh ``train`` of
``--gan-minutes`` from the PSNR run's best.pth (``model.pretrained``) with the recipe's gan.* /
loss.* settings (a recipe without gan.* is the control: more PSNR training); then ``infer`` of
bicubic, the PSNR model and every fine-tune on the test photos (49 tiles, ``infer.tta=1``:
averaging 8 transforms would blur the texture a GAN adds) and ``evaluate``'s columns against their
HR: PSNR, SSIM (RGB, the contest protocol), sharpness (Laplacian energy over the HR's: 1 = as much
fine detail, below = smoother) and LPIPS (only with ``--lpips-weights``, torchvision's
alexnet-owt-7be5be79.pth: a random backbone would rank nothing).

    python -m bench.gan_demo                        # CPU: demo data, edsr-tiny, 6 + 3 x 3 minutes
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import add_stage_options, demo_dataset, read_run_log, save_rows, stage_device, table
from pipeline.cli import main as cli
from pipeline.evaluate import evaluate_folders
from pipeline.models.perceptual import ImageQuality

DEMO = "configs/demo.yaml"
# The discriminator is the U-Net's 4-feature preset: the 64-feature one takes ~7 s per update of a
# batch of 8 64-px crops on a 2-core CPU, which would leave a few dozen steps in the budget.
# `psnr-more` is the control: the same fine-tune without a discriminator, so the GAN rows differ from
# it by the adversarial term alone, not by the extra minutes of training. Weights from 90-second
# trials on this machine: relativistic 0.1 / 0.3 raised sharpness from 0.15 to 0.19 / 0.26 for
# -0.17 / -0.63 dB; WGAN-GP at 0.1 turned to noise (sharpness 4, -5 dB), so it gets 0.01.
GAN_RECIPES = (
    "psnr-more:",
    "gan-adv-tv:gan.discriminator=unet-sn-nano,gan.loss=relativistic,gan.weight=0.1,loss.tv=1e-4",
    "gan-wgan-gp:gan.discriminator=unet-sn-nano,gan.loss=wgan-gp,gan.weight=0.01,gan.critic_steps=2",
)
FINE_TUNE = ("train.learning_rate=2e-4", "train.warmup_steps=0", "gan.learning_rate=2e-4")


def train(data: Path, models: Path, run: str, minutes: float, *extra: str) -> dict:
    argv = ["train", "--config", DEMO, "--data", str(data), f"paths.models={models}", f"run={run}",
            f"train.max_minutes={minutes}", "train.resume=never", *extra]
    if cli(argv) != 0:
        raise SystemExit(f"train {run} failed: python -m pipeline {' '.join(argv)}")
    log = read_run_log(models, run)
    val = [e for e in log if e["kind"] == "val"]
    return {"steps": val[-1]["step"], "val_psnr": val[-1]["val/psnr"]}


def predict(data: Path, models: Path, out: Path, run: str, *extra: str) -> Path:
    pred = out / run
    argv = ["infer", "--config", DEMO, "--data", str(data), f"paths.models={models}", f"run={run}",
            "infer.tta=1", "--output", str(pred), *extra]
    if cli(argv) != 0:
        raise SystemExit(f"infer {run} failed")
    return pred


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_options(p, "every train stage")
    p.add_argument("--model", default="edsr-tiny", help="the generator (model.name)")
    p.add_argument("--psnr-minutes", type=float, default=6.0, help="budget of the PSNR run")
    p.add_argument("--gan-minutes", type=float, default=3.0, help="budget of each GAN fine-tune")
    p.add_argument("--gan", nargs="+", default=list(GAN_RECIPES), help="NAME:key=value,... per fine-tune")
    p.add_argument("--lpips-weights", default="", help="torchvision alexnet-owt-7be5be79.pth for the LPIPS column")
    p.add_argument("--keep", type=Path, default=None, help="work here (kept) instead of a temporary folder")
    p.add_argument("--csv", type=Path, default=None, help="default bench/results/gan_demo_<device>.csv")
    args = p.parse_args()
    device = stage_device(args.device)
    with tempfile.TemporaryDirectory(prefix="gan_demo_") as tmp:
        work = args.keep or Path(tmp)
        data, models, out = demo_dataset(work, "--config", DEMO), work / "models", work / "pred"
        model = f"model.name={args.model}"
        runs = {"psnr": {"settings": f"{args.model}, PSNR objective (configs/demo.yaml)",
                         **train(data, models, "psnr", args.psnr_minutes, model, *args.overrides)}}
        start = f"model.pretrained={models / 'psnr' / 'best.pth'}"
        for recipe in args.gan:
            name, _, settings = recipe.partition(":")
            extra = [s for s in settings.split(",") if s]
            runs[name] = {"settings": " ".join([*FINE_TUNE, *extra]),
                          **train(data, models, name, args.gan_minutes, model, start, *FINE_TUNE, *extra,
                                  *args.overrides)}
        preds = {"bicubic": predict(data, models, out, "bicubic", "model.name=bicubic")}
        preds.update({run: predict(data, models, out, run) for run in runs})
        quality = ImageQuality(args.lpips_weights)
        rows = []
        for name, pred in preds.items():
            scores = evaluate_folders(pred, data / "test_hr", quality=quality)
            lpips = scores["lpips"].mean() if args.lpips_weights else "needs --lpips-weights (real alexnet)"
            rows.append({"method": name, "psnr": scores["psnr"].mean(), "ssim": scores["ssim"].mean(),
                         "sharpness": scores["sharpness"].mean(), "lpips": lpips,
                         **runs.get(name, {"settings": "MATLAB bicubic", "steps": 0, "val_psnr": float("nan")})})
    path, info = save_rows(rows, device, "gan_demo", args.csv)
    print(f"\nwrote {path}\n{info}\nPSNR run {args.psnr_minutes:g} min, each GAN fine-tune {args.gan_minutes:g} "
          f"min; means over the {len(scores)} held-out test photos; steps and val_psnr (the last validation, "
          "held-out fold) from the run's log")
    print(table(rows, ["method", "psnr", "ssim", "sharpness", "lpips", "steps", "val_psnr", "settings"]))


if __name__ == "__main__":
    main()
