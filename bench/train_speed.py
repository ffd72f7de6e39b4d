"""Training speed: our trainer's step against basicsr's own SRModel, same model, batch, patch, loss.

Both start from the same initial weights and see the same pre-made batches (random patches: the
content does not change the speed), so the data loader is out of the measurement. Ours is
``pipeline.train_loop.Trainer._train_step`` (autocast per ``train.precision``, channels_last, fp32
loss, EMA, cosine schedule per update); basicsr's is ``SRModel.optimize_parameters`` +
``update_learning_rate``, built in-process from an options dict, with a loss registered in its
LOSS_REGISTRY that computes the same 2*L1 + MSE, Adam with the same betas, and EMA 0.999. Steps
run in interleaved blocks after warm-up; samples/s is batch x steps / time of the measured steps.
The final loss of each is printed as a check that both train the same thing.

    python -m bench.train_speed                                  # CPU: tiny presets, ~5 min
    python -m bench.train_speed --models rrdb edsr swinir --lr-patch 64 --batch 16   # a GPU
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pipeline.compat  # noqa: F401  (installs the torchvision shim before any other basicsr import)
from bench.common import RESULTS, interleaved, machine, measure, median, pick, table, write_csv
from pipeline.config import Config, with_overrides
from pipeline.models import MODELS, build_model, model_kwargs
from pipeline.runtime import autocast_dtype, cpu_has_fast_bf16, precision_name

LOSS_NAME = "BenchContestLoss"  # registered once in basicsr's LOSS_REGISTRY


def register_loss() -> None:
    from basicsr.utils.registry import LOSS_REGISTRY

    if LOSS_NAME in LOSS_REGISTRY:
        return

    class BenchContestLoss(nn.Module):
        """2 * L1 + 1 * MSE, the contest loss (pipeline.train_loop.contest_loss with its defaults)."""

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


def our_trainer(name: str, init: dict, device: torch.device, cfg: Config, steps: int):
    """A Trainer around the table model, set up as pipeline.train.main does (no data loader)."""
    from timm.utils import ModelEmaV3
    from tqdm import tqdm

    from pipeline.train import _make_scheduler
    from pipeline.train_loop import Trainer

    t = cfg.train
    model = build_model(name).to(device)
    model.load_state_dict(init)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(device, t.precision)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    trainer = Trainer(
        cfg=cfg, rank=0, world=1, device=device, dtype=dtype, run_dir=Path(tempfile.gettempdir()), raw=model,
        model=model, ema=ModelEmaV3(model, decay=t.ema_decay, use_warmup=True) if t.ema_decay > 0 else None,
        optimizer=optimizer, scheduler=_make_scheduler(t, optimizer, steps, steps),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype is torch.float16), loader=None, batches=None,
        val_pairs=[], total_steps=steps, arch=name, kwargs=model_kwargs(name))
    trainer.bar = tqdm(disable=True)
    return trainer


def variants(device: torch.device, only: list[str] | None) -> dict[str, dict]:
    """Our trainer's settings per variant (basicsr's SRModel has none: fp32, NCHW)."""
    out = {"ours": {"train.precision": "auto", "train.channels_last": True},
           "ours fp32": {"train.precision": "fp32", "train.channels_last": True},
           "ours fp32 nchw": {"train.precision": "fp32", "train.channels_last": False}}
    if device.type == "cuda":
        out["ours fp16"] = {"train.precision": "fp16", "train.channels_last": True}
    elif not cpu_has_fast_bf16():
        del out["ours fp32"]  # auto is fp32 on this CPU: the same variant twice
    return {k: v for k, v in out.items() if not only or k in only}


def run_model(name: str, device: torch.device, args: argparse.Namespace) -> list[dict]:
    register_loss()
    torch.manual_seed(0)
    init = copy.deepcopy(build_model(name).state_dict())
    b, p = args.batch, args.lr_patch
    gen = torch.Generator().manual_seed(1)
    # uint8 batches as our loader yields them; basicsr's loader yields floats in [0,1].
    batches = [(torch.randint(0, 256, (b, 3, p, p), dtype=torch.uint8, generator=gen),
                torch.randint(0, 256, (b, 3, 4 * p, 4 * p), dtype=torch.uint8, generator=gen))
               for _ in range(4)]
    total = args.warmup + args.steps * args.rounds
    base = with_overrides(Config(), **{"model.name": name, "train.batch_size": b, "train.max_steps": total})
    runners, precision = {}, {}
    sr = basicsr_model(name, init, device, total, base)
    step_no = {"basicsr": 0}

    def basicsr_step(lr_u8: torch.Tensor, hr_u8: torch.Tensor) -> float:
        step_no["basicsr"] += 1
        sr.update_learning_rate(step_no["basicsr"])
        sr.feed_data({"lq": lr_u8.float().div(255), "gt": hr_u8.float().div(255)})
        sr.optimize_parameters(step_no["basicsr"])
        return sr.log_dict["l_pix"]
    runners["basicsr SRModel"], precision["basicsr SRModel"] = basicsr_step, "fp32 nchw"
    for label, over in variants(device, args.variants).items():
        cfg = with_overrides(base, **over)
        trainer = our_trainer(name, init, device, cfg, total)

        def ours_step(lr_u8: torch.Tensor, hr_u8: torch.Tensor, trainer=trainer) -> float:
            trainer._train_step(lr_u8, hr_u8)
            return float(trainer._window[-1][0])  # loss/total of the step (a device sync, as basicsr's .item())
        runners[label] = ours_step
        precision[label] = precision_name(trainer.dtype) + (" cl" if cfg.train.channels_last else " nchw")
    names = list(runners)
    secs: dict[str, list[float]] = {n: [] for n in names}
    peak = dict.fromkeys(names, 0.0)
    loss: dict[str, float] = {}
    for n in names:  # warm-up: allocator, oneDNN / cuDNN kernels
        for i in range(args.warmup):
            runners[n](*batches[i % len(batches)])

    def run(n: str, r: int) -> None:
        with measure(device) as m:
            for i in range(args.steps):
                loss[n] = runners[n](*batches[(r * args.steps + i) % len(batches)])
        secs[n].append(m["seconds"])
        peak[n] = max(peak[n], m["peak_mib"])
        print(f"  {name} {n}: {b * args.steps / m['seconds']:.2f} samples/s", flush=True)

    interleaved(names, args.rounds, run)
    ref = b * args.steps / median(secs["basicsr SRModel"])
    rows = []
    for n in names:
        sps = b * args.steps / median(secs[n])
        rows.append({"model": name, "trainer": n, "precision": precision[n], "batch": b, "lr_patch": p,
                     "steps": args.steps * args.rounds, "samples_per_s": sps, "vs_basicsr": sps / ref,
                     "peak_mib": peak[n], "final_loss": loss.get(n, math.nan)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--models", nargs="+", default=None,
                   help="table models (default CPU: edsr-tiny rrdb-tiny swinir-tiny edsr; GPU: rrdb edsr swinir)")
    p.add_argument("--batch", type=int, default=16, help="samples per step (train.batch_size)")
    p.add_argument("--lr-patch", type=int, default=None, help="LR patch side (HR = 4x); default 32 CPU, 64 GPU")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per trainer first")
    p.add_argument("--steps", type=int, default=4, help="measured steps per block")
    p.add_argument("--rounds", type=int, default=3, help="interleaved blocks per trainer")
    p.add_argument("--variants", nargs="*", default=None, help="only these of our variants (e.g. ours)")
    p.add_argument("--csv", type=Path, default=None, help="default bench/results/train_speed_<device>.csv")
    args = p.parse_args()
    device = pick(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as pipeline.train does; basicsr's train.py sets it too
    args.lr_patch = args.lr_patch or (64 if device.type == "cuda" else 32)
    models = args.models or (["rrdb", "edsr", "swinir"] if device.type == "cuda"
                             else ["edsr-tiny", "rrdb-tiny", "swinir-tiny", "edsr"])
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}")
    info = machine(device)
    print(info, flush=True)
    rows = []
    for name in models:
        rows += run_model(name, device, args)
    for r in rows:
        r["machine"] = info
    path = write_csv(rows, args.csv or RESULTS / f"train_speed_{device.type}.csv")
    print(f"\nwrote {path}\n{info}\nsamples/s: median over {args.rounds} interleaved blocks of {args.steps} steps "
          f"after {args.warmup} warm-up steps; batch {args.batch}, LR patch {args.lr_patch} (HR {4 * args.lr_patch})")
    print(table(rows, ["model", "trainer", "precision", "batch", "lr_patch", "steps", "samples_per_s", "vs_basicsr",
                       "peak_mib", "final_loss"]))


if __name__ == "__main__":
    main()
