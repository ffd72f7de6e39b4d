"""Training speed: our trainer's step against basicsr's own SRModel, same model, batch, patch, loss.

Both start from the same initial weights and see the same pre-made batches in the same order
(random patches: the content does not change the speed), so the data loader is out of the
measurement (bench/train_e2e.py measures the whole stage). Ours is
``pipeline.training.loop.Trainer._train_step``, set up as ``pipeline.train.main`` does it (optimizer
update kernel, precision rule, TF32, torch.compile through ``Trainer.use_compile``); basicsr's is
``SRModel.optimize_parameters`` + ``update_learning_rate``, built in-process from an options dict,
with a loss registered in its LOSS_REGISTRY that computes the same 2*L1 + MSE, Adam with the same
betas, and EMA 0.999. Every trainer runs the same warm-up steps (compilation happens there: its
seconds are the `warmup_s` column), then steps in interleaved blocks; samples/s is batch x steps /
time of the measured steps (median block). FLOPs of one step (forward + backward, counted by
torch.utils.flop_counter on the model: convolutions and matrix products) give the achieved
TFLOP/s and its share of the device's bf16 peak (bench/flops.py). The final loss of each trainer
is the loss of the same last batch, so equal losses show that all trained the same thing.

Variants of ours (``--variants``; `ours` is what a long `train` run does with default settings):

    ours                 precision auto, compile auto as for a long run (CUDA: CUDA graphs), fused Adam on CUDA
    ours eager           the same without torch.compile
    ours eager fp32      fp32 (TF32 on CUDA), eager: the reference for "same final loss as eager fp32"
    ours eager bf16      bf16 autocast, eager
    ours eager foreach   the multi-tensor Adam update instead of the fused kernel (the update before fused)
    ours eager nchw      without channels_last
    ours compile default torch.compile mode=default (no CUDA graphs)
    ours graphs fp32     CUDA graphs (mode=reduce-overhead), fp32
    ours graphs bf16     CUDA graphs, bf16

``--targets`` answers issue 8's GPU targets in one command: RRDB and EDSR at LR 64 (>= 3x basicsr)
and LR 128 (>= 2x), SwinIR at LR 64 (>= 1.5x), each with the final loss of `ours` within 1% of
`ours eager fp32`; it prints a PASS/FAIL table after the full one.

    python -m bench.train_speed                                   # CPU: tiny presets, ~5 min
    python -m bench.train_speed --device cuda --targets           # GPU: the issue's targets
    python -m bench.train_speed --device cuda --models rrdb --variants all
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import pipeline.core.compat  # noqa: F401  (installs the torchvision shim before any other basicsr import)
from bench.common import interleaved, machine, measure, median, pick, save_rows, table
from bench.flops import count_flops, peak_tflops, utilisation
from pipeline.core.config import Config, with_overrides
from pipeline.core.runtime import compile_mode, enable_tf32, precision_name, train_autocast_dtype
from pipeline.models.table import MODELS, build_model, model_kwargs

LOSS_NAME = "BenchContestLoss"  # registered once in basicsr's LOSS_REGISTRY
BASICSR = "basicsr SRModel"
LOSS_RTOL = 0.01  # "same final loss": within 1% of eager fp32 (bf16 vs fp32 differed by <0.1% on the H100)


@dataclass(frozen=True)
class Variant:
    overrides: dict[str, Any]
    foreach: bool = False  # the multi-tensor update instead of this device's default kernel


VARIANTS = {
    "ours": Variant({}),
    "ours eager": Variant({"train.compile": "off"}),
    "ours eager fp32": Variant({"train.compile": "off", "train.precision": "fp32"}),
    "ours eager bf16": Variant({"train.compile": "off", "train.precision": "bf16"}),
    "ours eager foreach": Variant({"train.compile": "off"}, foreach=True),
    "ours eager nchw": Variant({"train.compile": "off", "train.channels_last": False}),
    "ours compile default": Variant({"train.compile": "default"}),
    "ours graphs fp32": Variant({"train.compile": "reduce-overhead", "train.precision": "fp32"}),
    "ours graphs bf16": Variant({"train.compile": "reduce-overhead", "train.precision": "bf16"}),
}
GPU_DEFAULT = ("ours", "ours eager", "ours eager fp32", "ours eager foreach")
CPU_DEFAULT = ("ours", "ours eager nchw")
# (model, LR patch, required samples/s ratio to basicsr) of issue 8, batch 16 on one GPU.
TARGETS = (("rrdb", 64, 3.0), ("edsr", 64, 3.0), ("rrdb", 128, 2.0), ("edsr", 128, 2.0), ("swinir", 64, 1.5))


def register_loss() -> None:
    from basicsr.utils.registry import LOSS_REGISTRY

    if LOSS_NAME in LOSS_REGISTRY:
        return

    class BenchContestLoss(nn.Module):
        """2 * L1 + 1 * MSE, the contest loss (pipeline.training.losses.contest_loss with its defaults)."""

        def __init__(self, l1: float = 2.0, mse: float = 1.0) -> None:
            super().__init__()
            self.l1, self.mse = l1, mse

        def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.l1 * F.l1_loss(pred, target) + self.mse * F.mse_loss(pred, target)

    BenchContestLoss.__name__ = LOSS_NAME
    LOSS_REGISTRY.register(BenchContestLoss)


def basicsr_network(name: str) -> dict:
    """basicsr's ``network_g`` options for a table model (the same arguments our builders pass)."""
    kw = model_kwargs(name)
    if name.startswith("rrdb"):
        return {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, "scale": 4, **kw}
    if name.startswith("edsr"):
        return {"type": "EDSR", "num_in_ch": 3, "num_out_ch": 3, "upscale": 4, "img_range": 255.0, **kw}
    if name.startswith("swinir"):
        return {"type": "SwinIR", "upscale": 4, "in_chans": 3, "img_range": 1.0, "upsampler": "pixelshuffle",
                "resi_connection": "1conv", **kw}
    raise SystemExit(f"{name}: no basicsr equivalent in this benchmark (rrdb*, edsr*, swinir*)")


def basicsr_model(name: str, init: dict, device: torch.device, steps: int, cfg: Config):
    from basicsr.models.sr_model import SRModel

    t = cfg.train
    opt = {
        "num_gpu": 1 if device.type == "cuda" else 0, "is_train": True, "dist": False, "rank": 0, "world_size": 1,
        "path": {"pretrain_network_g": None},
        "network_g": basicsr_network(name),
        "train": {
            "ema_decay": t.ema_decay,
            "optim_g": {"type": "Adam", "lr": t.learning_rate, "weight_decay": t.weight_decay},
            "scheduler": {"type": "CosineAnnealingRestartLR", "periods": [steps], "restart_weights": [1],
                          "eta_min": t.min_learning_rate},
            "pixel_opt": {"type": LOSS_NAME, "l1": t.loss_l1, "mse": t.loss_mse},
        },
    }
    model = SRModel(opt)
    model.net_g.load_state_dict(init)
    if t.ema_decay > 0:
        model.net_g_ema.load_state_dict(init)
    return model


def our_trainer(name: str, init: dict, device: torch.device, cfg: Config, steps: int, lr_patch: int,
                foreach: bool = False):
    """A Trainer around the table model, set up as pipeline.train.main does (no data loader, no files)."""
    from pipeline.core.distributed import Dist
    from pipeline.core.layout import RunLayout
    from pipeline.training.loop import Trainer
    from pipeline.training.losses import build_generator_loss
    from pipeline.training.objectives import PixelObjective
    from pipeline.training.task import TrainTask
    from pipeline.training.updates import GeneratorUpdates, Schedule

    t = cfg.train
    model = build_model(name).to(device)
    model.load_state_dict(init)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = train_autocast_dtype(device, t.precision, t.batch_size * lr_patch**2)
    schedule = Schedule.of(t, steps, steps)
    updates = GeneratorUpdates.build(t, model, device, dtype, schedule)
    if foreach:
        updates.optimizer = type(updates.optimizer)(model.parameters(), lr=t.learning_rate,
                                                    weight_decay=t.weight_decay, foreach=True, fused=False)
        updates.scheduler = schedule.build(updates.optimizer)
    run = RunLayout(Path(tempfile.gettempdir()), "train_speed")  # nothing is written (logging disabled)

    def to_device(x: torch.Tensor) -> torch.Tensor:  # as the image task does it (pipeline.train.image_task)
        x = x.to(device, non_blocking=True).float().div_(255)
        return x.contiguous(memory_format=torch.channels_last) if t.channels_last else x

    # A task without data: the bench feeds the step its own batches (Trainer._train_step).
    task = TrainTask(generator=model, arch=name, kwargs=model_kwargs(name), loader=None, batches=None,
                     to_device=to_device, validation=None, discriminator=None, sample_pixels=lr_patch**2,
                     description="")
    objective = PixelObjective(build_generator_loss(cfg).to(device), schedule, t.blowup, t.blowup_points)
    trainer = Trainer(cfg=cfg, d=Dist(0, 1, device), run=run, task=task, objective=objective, updates=updates,
                      dtype=dtype, total_steps=steps)
    trainer.use_compile(compile_mode(t.compile, device, math.inf))  # `auto` as for a long run
    return trainer


def step_flops(name: str, device: torch.device, batch: int, lr_patch: int) -> int:
    """FLOPs of one training step (forward + backward of the model; fp32, eager)."""
    model = build_model(name).to(device)
    lr = torch.rand(batch, 3, lr_patch, lr_patch, device=device)

    def step() -> None:
        model(lr).float().abs().mean().backward()
    return count_flops(step)


def run_case(name: str, lr_patch: int, device: torch.device, args: argparse.Namespace,
             labels: list[str], peak: dict[str, float | None]) -> list[dict]:
    register_loss()
    torch.manual_seed(0)
    init = copy.deepcopy(build_model(name).state_dict())
    b, p = args.batch, lr_patch
    gen = torch.Generator().manual_seed(1)
    # uint8 batches as our loader yields them; basicsr's loader yields floats in [0,1].
    batches = [(torch.randint(0, 256, (b, 3, p, p), dtype=torch.uint8, generator=gen),
                torch.randint(0, 256, (b, 3, 4 * p, 4 * p), dtype=torch.uint8, generator=gen))
               for _ in range(4)]
    total = args.warmup + args.steps * args.rounds
    base = with_overrides(Config(), **{"model.name": name, "train.batch_size": b, "train.max_steps": total})
    runners, precision = {}, {}
    sr = basicsr_model(name, init, device, total, base)
    step_no = {BASICSR: 0}

    def basicsr_step(lr_u8: torch.Tensor, hr_u8: torch.Tensor) -> float:
        step_no[BASICSR] += 1
        sr.update_learning_rate(step_no[BASICSR])
        sr.feed_data({"lq": lr_u8.float().div(255), "gt": hr_u8.float().div(255)})
        sr.optimize_parameters(step_no[BASICSR])
        return sr.log_dict["l_pix"]
    runners[BASICSR], precision[BASICSR] = basicsr_step, "fp32 nchw"
    for label in labels:
        variant = VARIANTS[label]
        cfg = with_overrides(base, **variant.overrides)
        trainer = our_trainer(name, init, device, cfg, total, p, variant.foreach)

        def ours_step(lr_u8: torch.Tensor, hr_u8: torch.Tensor, trainer=trainer) -> float:
            trainer._train_step(lr_u8, hr_u8)
            return float(trainer._window[-1][0])  # loss/total of the step (a device sync, as basicsr's .item())
        runners[label] = ours_step
        update = "fused" if trainer.optimizer.defaults.get("fused") else "foreach"
        precision[label] = (precision_name(trainer.dtype) + (" cl" if cfg.train.channels_last else " nchw")
                            + f" {update}" + (f" {trainer.compiled}" if trainer.compiled != "off" else ""))
    names = list(runners)
    secs: dict[str, list[float]] = {n: [] for n in names}
    peak_mib = dict.fromkeys(names, 0.0)
    warmup: dict[str, float] = {}
    loss: dict[str, float] = {}
    for n in names:  # warm-up: allocator, oneDNN / cuDNN kernels, compilation and CUDA graph capture
        with measure(device) as m:
            for i in range(args.warmup):
                runners[n](*batches[i % len(batches)])
        warmup[n] = m["seconds"]

    def run(n: str, r: int) -> None:
        with measure(device) as m:
            for i in range(args.steps):
                loss[n] = runners[n](*batches[(r * args.steps + i) % len(batches)])
        secs[n].append(m["seconds"])
        peak_mib[n] = max(peak_mib[n], m["peak_mib"])
        print(f"  {name} LR {p} {n}: {b * args.steps / m['seconds']:.2f} samples/s", flush=True)

    interleaved(names, args.rounds, run)
    flops = step_flops(name, device, b, p)
    ref = b * args.steps / median(secs[BASICSR])
    rows = []
    for n in names:
        sps = b * args.steps / median(secs[n])
        rows.append({"model": name, "trainer": n, "precision": precision[n], "batch": b, "lr_patch": p,
                     "steps": args.steps * args.rounds, "samples_per_s": sps, "vs_basicsr": sps / ref,
                     "gflop_per_step": flops / 1e9, **utilisation(flops, median(secs[n]) / args.steps, peak),
                     "peak_mib": peak_mib[n], "warmup_s": warmup[n], "final_loss": loss.get(n, math.nan)})
    return rows


def target_rows(rows: list[dict]) -> list[dict]:
    """Issue 8's targets from the full table: `ours` vs basicsr, and its final loss vs eager fp32."""
    out = []
    for name, p, need in TARGETS:
        case = {r["trainer"]: r for r in rows if r["model"] == name and r["lr_patch"] == p}
        if "ours" not in case:
            continue
        ours, fp32 = case["ours"], case.get("ours eager fp32")
        diff = abs(ours["final_loss"] - fp32["final_loss"]) / fp32["final_loss"] if fp32 else math.nan
        out.append({"model": name, "lr_patch": p, "ours": ours["precision"], "vs_basicsr": ours["vs_basicsr"],
                    "target": need, "speed": "PASS" if ours["vs_basicsr"] >= need else "FAIL",
                    "loss_diff_pct": 100 * diff, "loss": "PASS" if diff <= LOSS_RTOL else "FAIL",
                    "pct_datasheet_peak": ours["pct_datasheet_peak"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--models", nargs="+", default=None,
                   help="table models (default CPU: edsr-tiny rrdb-tiny swinir-tiny edsr; GPU: rrdb edsr swinir)")
    p.add_argument("--batch", type=int, default=16, help="samples per step (train.batch_size)")
    p.add_argument("--lr-patch", type=int, nargs="+", default=None, help="LR patch sides (HR = 4x); default 32 "
                   "CPU, 64 GPU")
    p.add_argument("--targets", action="store_true", help="issue 8's cases (models and LR patches) and variants, "
                   "then the PASS/FAIL table")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per trainer first (>= 3 for CUDA graphs)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per block (default 4 CPU, 10 GPU)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved blocks per trainer")
    p.add_argument("--variants", nargs="*", default=None,
                   help=f"our variants, or 'all' (default GPU: {', '.join(GPU_DEFAULT)}; "
                        f"CPU: {', '.join(CPU_DEFAULT)})")
    p.add_argument("--csv", type=Path, default=None, help="default bench/results/train_speed_<device>.csv")
    args = p.parse_args()
    device = pick(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as pipeline.train does; basicsr's train.py sets it too
        enable_tf32()
    args.steps = args.steps or (10 if device.type == "cuda" else 4)
    labels = list(VARIANTS) if args.variants == ["all"] else args.variants
    labels = labels or list(GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT)
    if args.targets:
        labels = list(dict.fromkeys(["ours", "ours eager fp32", *labels]))
        cases = [(m, lp) for m, lp, _ in TARGETS if not args.models or m in args.models]
    else:
        models = args.models or (["rrdb", "edsr", "swinir"] if device.type == "cuda"
                                  else ["edsr-tiny", "rrdb-tiny", "swinir-tiny", "edsr"])
        patches = args.lr_patch or [64 if device.type == "cuda" else 32]
        cases = [(m, lp) for m in models for lp in patches]
    if device.type != "cuda":
        labels = [v for v in labels if v != "ours eager"]  # the same as `ours` on a CPU: compile auto is off
    unknown = [m for m, _ in cases if m not in MODELS] + [v for v in labels if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown models or variants {unknown}; variants: {', '.join(VARIANTS)}")
    info = machine(device)
    peak = peak_tflops(device)
    print(f"{info}\nbf16 peak TFLOP/s: datasheet {peak['datasheet']}, measured {peak['measured']:.1f}", flush=True)
    rows = []
    for name, lr_patch in cases:
        rows += run_case(name, lr_patch, device, args, labels, peak)
    path, info = save_rows(rows, device, "train_speed", args.csv)
    print(f"\nwrote {path}\n{info}\nsamples/s: median over {args.rounds} interleaved blocks of {args.steps} steps "
          f"after {args.warmup} warm-up steps; batch {args.batch}; tflops = counted FLOPs of a step / its time")
    print(table(rows, ["model", "trainer", "precision", "lr_patch", "samples_per_s", "vs_basicsr", "gflop_per_step",
                       "tflops", "pct_datasheet_peak", "pct_measured_peak", "peak_mib", "warmup_s", "final_loss"]))
    if args.targets:
        print(f"\nissue 8 targets (`ours` = default settings of a long run; loss within {100 * LOSS_RTOL:g}% of "
              "eager fp32 on the same last batch)")
        print(table(target_rows(rows), ["model", "lr_patch", "ours", "vs_basicsr", "target", "speed",
                                        "loss_diff_pct", "loss", "pct_datasheet_peak"]))


if __name__ == "__main__":
    main()
