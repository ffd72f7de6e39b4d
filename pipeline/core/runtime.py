"""Device and precision choices shared by train, infer and the benchmarks."""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def pick_device() -> torch.device:
    """CUDA when present (the local rank's GPU under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# -- precision: what `auto` means, measured per device and kind of run ---------------------------------
# SR_BF16=force treats the CPU as one with native bf16, SR_BF16=forbid as one without: what `auto` resolves
# to on the CPU then depends on the policy alone, not on the machine (CI runs the suite both ways).
BF16_ENV = "SR_BF16"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_bf16() -> str:
    """How this CPU computes bf16: ``amx`` (AMX tiles), ``avx512_bf16`` (AVX-512 BF16 dot products, no AMX)
    or ``emulated`` (oneDNN converts to fp32: measured 10x slower than fp32 on an AVX2-only EPYC).

    ``SR_BF16=force`` reads as ``avx512_bf16`` where the CPU has no native bf16 (the arithmetic stays
    the CPU's), ``SR_BF16=forbid`` as ``emulated``.
    """
    setting = os.environ.get(BF16_ENV, "").strip().lower()
    if setting not in ("", "force", "forbid"):
        from pipeline.core.errors import UserError

        raise UserError(f"{BF16_ENV}={setting!r}: use force, forbid or leave it unset")
    flags = _cpu_flags()
    native = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "emulated"
    if setting == "forbid":
        return "emulated"
    return "avx512_bf16" if setting == "force" and native == "emulated" else native


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (or ``SR_BF16=force`` says to take it so)."""
    return cpu_bf16() != "emulated"


def device_kind(device: torch.device) -> str:
    """The device as the precision policy tells devices apart: ``cuda``, or ``cpu-`` + ``cpu_bf16()``."""
    return "cuda" if device.type == "cuda" else f"cpu-{cpu_bf16()}"


@dataclass(frozen=True)
class RunKind:
    """A training run as far as its arithmetic goes: what a sample is and what the step optimises."""

    samples: str = "image"  # image (2-D convolutions) or volume (3-D)
    objective: str = "psnr"  # psnr, gan (gan.discriminator) or cycle (the slices' cycle GAN)
    gan_loss: str = ""  # gan.loss of a GAN run: wgan-gp adds a gradient penalty (a second backward)

    @property
    def key(self) -> str:
        return " ".join(p for p in (self.samples, self.objective, self.gan_loss) if p)


@dataclass(frozen=True)
class Precision:
    """The autocast dtype a setting resolved to (None = fp32) and why, for the run's first line."""

    dtype: torch.dtype | None
    why: str

    @property
    def name(self) -> str:
        return precision_name(self.dtype)


# Where `auto` trains in bf16: (device kind, RunKind.key) -> the measurement that showed it stable.
# Anything not listed trains in fp32 under `auto`: bf16 is a measured choice, never an assumption.
BF16_STABLE: dict[tuple[str, str], str] = {
    ("cuda", "image psnr"): "RRDB / EDSR / SwinIR steps measured on an H100 (shared/measurements/h100-2026-11-23)",
    ("cpu-amx", "image psnr"): "edsr-tiny and CRAFT runs on a Xeon with AMX (BENCHMARKS.md, section 12)",
    ("cpu-avx512_bf16", "image psnr"): "demo.yaml (edsr-tiny, 5 seeds) and finetune.yaml (CRAFT, 3 seeds) on an EPYC "
                                       "with AVX-512 BF16: no divergence, 1.4-1.5x the fp32 step (BENCHMARKS.md, 13)",
}
# Kinds measured unstable in bf16: why `auto` keeps them in fp32 (the reason the first line gives).
BF16_UNSTABLE: dict[tuple[str, str], str] = {
    ("cpu-avx512_bf16", "volume"): "oneDNN's bf16 weight gradient of a 3-D convolution over a 2-voxel side "
                                   "returns garbage and NaN at random on this CPU (the 3-D critic's last layers)",
}


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision setting for inference, or None for plain fp32.

    ``auto``: bf16 on CUDA GPUs that support it (fp16 on older ones), bf16 on CPUs with native
    bf16, fp32 elsewhere. Explicit ``bf16``/``fp16`` are honoured (fp16 on CPU is refused).
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return torch.float16
    raise ValueError(f"unknown precision {precision!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# Training steps smaller than this many LR pixels per GPU (batch x side^2) are launch-bound on a GPU:
# measured on an H100 (RRDB, batch 16), LR 64 = 65k px: bf16 103.7 samples/s vs fp32-TF32 123.0
# (EDSR 796 vs 967, SwinIR 54.6 vs 53.2); LR 128 = 262k px: bf16 73.9 vs fp32 38.6 (1.9x). The
# threshold sits between the two measured sizes (shared/measurements/h100-2026-11-23).
BF16_MIN_LR_PIXELS = 2**17


def train_precision(device: torch.device, precision: str, kind: RunKind, lr_pixels_per_step: int,
                    deterministic: bool = False) -> Precision:
    """The training precision of a setting, and why.

    Explicit ``fp32`` / ``bf16`` / ``fp16`` are honoured. ``auto`` is bf16 only where bf16 is fast on the
    device (native on the CPU; on CUDA from ``BF16_MIN_LR_PIXELS`` LR pixels per GPU per step, below which
    a step is launch-bound) and the kind of run was measured stable in it (``BF16_STABLE``); else fp32.
    ``deterministic``: fp32. A deterministic run promises the same weights from the same command (killed
    and resumed, split over torchrun's processes, compiled) up to fp32 rounding; bf16 rounds each product
    to 8 bits of mantissa, so another summation order moves weights by ~1e-3 where fp32 moves them by ~1e-7.
    """
    if precision != "auto":
        dtype = autocast_dtype(device, precision)
        return Precision(dtype, f"train.precision={precision}")
    where = device_kind(device)
    if deterministic:
        return Precision(None, "auto: a deterministic run")
    if where == "cpu-emulated":
        return Precision(None, "auto: this CPU has no native bf16 (oneDNN emulates it, ~10x slower than fp32)")
    unstable = next((why for (w, k), why in BF16_UNSTABLE.items() if w == where and kind.key.startswith(k)), None)
    if unstable:
        return Precision(None, f"auto: {unstable}")
    shown = BF16_STABLE.get((where, kind.key))
    if shown is None:
        return Precision(None, f"auto: bf16 is not measured stable for {kind.key} runs on {where}")
    if device.type == "cuda" and lr_pixels_per_step < BF16_MIN_LR_PIXELS:
        return Precision(None, f"auto: {lr_pixels_per_step} LR pixels per step (< {BF16_MIN_LR_PIXELS}) are "
                               "launch-bound on a GPU, where fp32 (TF32) is faster")
    dtype = autocast_dtype(device, "auto")
    return Precision(dtype, f"auto: {kind.key} runs measured stable in bf16 on {where}: {shown}")


def train_autocast_dtype(device: torch.device, precision: str, lr_pixels_per_step: int,
                         deterministic: bool = False, kind: RunKind = RunKind()) -> torch.dtype | None:
    """``train_precision``'s dtype alone."""
    return train_precision(device, precision, kind, lr_pixels_per_step, deterministic).dtype


def enable_tf32() -> None:
    """fp32 matrix products and convolutions on CUDA tensor cores as TF32 (10-bit mantissa inputs,
    fp32 accumulation): the fp32 path the GPU measurements use. Through the fp32_precision API only:
    torch refuses to mix it with the legacy allow_tf32 / set_float32_matmul_precision settings."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def optimizer_flags(device: torch.device) -> dict[str, bool]:
    """How Adam/AdamW apply their update: one fused kernel on CUDA (measured on an H100, RRDB:
    the unfused update was 13.7 ms of a ~123 ms step; fused, 96 -> 127 samples/s), one multi-tensor
    (foreach) pass over all parameters elsewhere."""
    return {"fused": True, "foreach": False} if device.type == "cuda" else {"fused": False, "foreach": True}


# -- torch.compile: the one rule of `auto` (train.compile, infer.compile) -------------------------------
# Compiling pays when the time it saves is at least COMPILE_MARGIN times its one-off cost (the
# compile and warm-up): the gains below were measured on one model (RRDB), and others may gain less.
# Never on the CPU: minutes of compiling on 2 cores, and no gain was measured there (BENCHMARKS.md).
COMPILE_MARGIN = 2.0


@dataclass(frozen=True)
class CompileGain:
    """A measured torch.compile: its one-off cost, the share of eager time it saves, the mode."""

    cost_seconds: float
    saved_share: float
    mode: str

    @property
    def min_eager_seconds(self) -> float:
        """Eager seconds of work ahead from which compiling pays (the rule of ``auto_compile``)."""
        return COMPILE_MARGIN * self.cost_seconds / self.saved_share


# Training step, H100 (RRDB, batch 16, LR 64, fused Adam): eager 127 samples/s; mode=reduce-overhead
# (CUDA graphs) 324 after a 132 s warm-up (break-even after ~3.6 min), so `auto` compiles when
# ~7 min of training are left; mode=default gained far less (149 after 136 s).
TRAIN_COMPILE = CompileGain(132.0, 1 - 127 / 324, "reduce-overhead")
AUTO_COMPILE_MIN_SECONDS = TRAIN_COMPILE.min_eager_seconds
# Inference, H100 (RRDB, 512 LR, 49 tiles of 128^2 x 8 ways, 4 tiles per forward, bf16;
# shared/measurements/h100-2026-11-23/rrdb_infer_levers.txt): compiling and warming up took
# 46-62 s, then an image took 1.35 s instead of 2.05 s.
INFER_COMPILE = CompileGain(60.0, 0.7 / 2.05, "default")
INFER_EAGER_SECONDS_PER_PIXEL = 2.05 / (49 * 8 * 128 * 128)  # LR pixels through the model (tiles x ways)


def auto_compile(setting: str, device: torch.device, eager_seconds: float, gain: CompileGain) -> str:
    """The torch.compile mode for a compile setting ('off' = eager). Explicit modes are honoured;
    ``auto`` compiles in ``gain.mode`` on CUDA when ``eager_seconds`` of work lie ahead, at least
    ``gain.min_eager_seconds`` (the saving is COMPILE_MARGIN x the cost)."""
    if setting != "auto":
        return setting
    pays = device.type == "cuda" and eager_seconds >= gain.min_eager_seconds
    return gain.mode if pays else "off"


def compile_mode(setting: str, device: torch.device, seconds_left: float) -> str:
    """``train.compile``: ``auto_compile`` for ``seconds_left`` of training ahead (inf: no limits)."""
    return auto_compile(setting, device, seconds_left, TRAIN_COMPILE)


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Measure peak memory of the block in MiB: CUDA allocator peak, or process max RSS on CPU."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        # ru_maxrss is KiB on Linux; it is the process high-water mark, not the block's alone.
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
