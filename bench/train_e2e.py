"""The train stage end to end against its step alone: what the loader, validation and checkpoints cost.

For each loader setting (``--workers``) the real stage (``pipeline.train.main``: loader workers
decoding PNG patches, augmentation, validation every ``train.val_every`` steps, checkpoints,
logs) runs ``--steps`` steps of a fresh run; its samples/s comes from the run's own log.jsonl
between the first and the last log point (``time_s``), so it includes everything the loop does
in that span: `stage` = with the validations, `train only` = the logged training rate, which
excludes them. `step only` is ``bench.train_speed``'s measurement of the same model, batch,
sample size, precision and compile setting on pre-made batches, in the same process. The target
of issue 8 is stage / step-only >= 0.9.

The dataset is ``--data`` (prepared and patchified) or, by default, the demo dataset built in a
temporary folder and cut with ``--patch`` (HR pixels).

    python -m bench.train_e2e                                  # CPU: edsr-tiny, demo data, ~5 min
    python -m bench.train_e2e --device cuda --model rrdb --patch 512 --crop 64 --steps 600 --workers 8
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from bench.common import add_stage_options, demo_dataset, measure, read_run_log, save_rows, stage_device, table
from bench.train_speed import our_trainer
from pipeline.core.config import Config, load_config
from pipeline.core.layout import DataLayout
from pipeline.models.table import build_model
from pipeline.training.patch_data import read_pair


def stage_config(data: Path, models: Path, args: argparse.Namespace, workers: int) -> Config:
    return load_config(args.config, [f"data.dir={data}", f"paths.models={models}", f"run=e2e_w{workers}",
                                     f"model.name={args.model}", f"train.batch_size={args.batch}",
                                     f"train.crop={args.crop}", f"train.max_steps={args.steps}",
                                     f"train.workers={workers}", "train.resume=never", *args.overrides])


def lr_side(cfg: Config) -> int:
    """The LR side of a training sample: the crop, or the patches' side."""
    pair = DataLayout(Path(cfg.data.dir)).patches.training_pairs(cfg.data.val_fold)[0]
    return cfg.train.crop or min(read_pair(pair, cfg.data.scale)[0].shape[:2])


def stage_run(data: Path, models: Path, args: argparse.Namespace, workers: int) -> dict:
    """One fresh train run of ``args.steps`` steps; rates from its log.jsonl."""
    from pipeline import train

    cfg = stage_config(data, models, args, workers)
    train.main(cfg)
    log = read_run_log(models, cfg.run)
    warm = max([e["step"] for e in log if e["kind"] == "compile"], default=0)  # compiled from here on
    logged = [e for e in log if e["kind"] == "train" and e["step"] > warm]
    first, last = logged[0], logged[-1]
    # A validation at a log step runs after that step's log line: those from `first` on, before `last`.
    span = [e for e in log if e["kind"] == "val" and first["step"] <= e["step"] < last["step"]]
    val_s = sum(e["val/seconds"] for e in span)
    wall = last["time_s"] - first["time_s"]
    samples = (last["step"] - first["step"]) * args.batch
    return {"workers": workers, "steps": last["step"] - first["step"], "stage": samples / wall,
            "train_only": samples / max(wall - val_s, 1e-9), "validations": len(span),
            "val_share_pct": 100 * val_s / wall, "lr_side": lr_side(cfg), "cfg": cfg}


def step_only(cfg: Config, device: torch.device, steps: int) -> float:
    """bench.train_speed's step on pre-made uint8 batches: samples/s over ``steps`` steps after warm-up."""
    t, side = cfg.train, lr_side(cfg)
    torch.manual_seed(0)
    init = copy.deepcopy(build_model(cfg.model.name).state_dict())
    trainer = our_trainer(cfg.model.name, init, device, cfg, steps + 5, side)
    gen = torch.Generator().manual_seed(1)
    b = t.batch_size
    batch = (torch.randint(0, 256, (b, 3, side, side), dtype=torch.uint8, generator=gen),
             torch.randint(0, 256, (b, 3, 4 * side, 4 * side), dtype=torch.uint8, generator=gen))
    for _ in range(5):
        trainer._train_step(*batch)
    with measure(device) as m:
        for _ in range(steps):
            trainer._train_step(*batch)
        float(trainer._window[-1][0])
    return b * steps / m["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_options(p, "the stage")
    p.add_argument("--data", type=Path, default=None, help="a prepared + patchified dataset (default: demo data)")
    p.add_argument("--patch", type=int, default=128, help="HR patch size when building the demo data")
    p.add_argument("--config", default=None, help="YAML settings for the stage (then the flags below)")
    p.add_argument("--model", default="edsr-tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=0, help="train.crop (LR px; 0 = whole patches)")
    p.add_argument("--steps", type=int, default=200, help="steps of each stage run")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="train.workers settings to run")
    p.add_argument("--csv", type=Path, default=None, help="default bench/results/train_e2e_<device>.csv")
    args = p.parse_args()
    device = stage_device(args.device)
    with tempfile.TemporaryDirectory(prefix="train_e2e_") as tmp:
        data = args.data or demo_dataset(Path(tmp), f"patchify.size={args.patch}")
        rows = []
        for workers in args.workers:
            # The step alone is measured right before and right after the stage run, so a shared
            # machine's load drifts hit both sides; the spread says how much it drifted.
            before = step_only(stage_config(data, Path(tmp) / "models", args, workers), device, args.steps // 2)
            row = stage_run(data, Path(tmp) / "models", args, workers)
            after = step_only(row.pop("cfg"), device, args.steps // 2)
            row["step_only"] = (before + after) / 2
            row["step_only_spread_pct"] = 100 * abs(before - after) / row["step_only"]
            row.update({"model": args.model, "batch": args.batch, "stage_vs_step": row["stage"] / row["step_only"],
                        "train_only_vs_step": row["train_only"] / row["step_only"]})
            rows.append(row)
            print(f"  workers {workers}: stage {row['stage']:.1f} samples/s, step only {row['step_only']:.1f} "
                  f"({row['stage_vs_step']:.2f}x)", flush=True)
    path, info = save_rows(rows, device, "train_e2e", args.csv)
    print(f"\nwrote {path}\n{info}\nstage = samples/s of the train stage between its first and last log point "
          "(validations and checkpoints included); train only = without the validations' time")
    print(table(rows, ["model", "batch", "lr_side", "workers", "steps", "stage", "train_only", "step_only",
                       "step_only_spread_pct", "stage_vs_step", "train_only_vs_step", "validations", "val_share_pct"]))


if __name__ == "__main__":
    main()
