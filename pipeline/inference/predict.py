"""The inference core shared by ``infer`` and ``ablate``: models + LR images + settings -> SR images.

``predict_images(models, lr_images, settings)`` returns float RGB images (unclamped, fp32) and a
``Timing``; ``iter_predict`` is the streaming form ``infer`` uses so that each image is written
as soon as it is ready. Per image and window (``windows``: the one of ``tile`` / ``stride``, or each
of ``windows``, ``auto`` resolved per image size): tiles (``tiling.run_tiles``) whose batches go
through every model's self-ensemble (``ensemble.average_models``, merged by ``merge``), all under
autocast when the settings ask for it; the windows' results are merged by ``merge`` too
(``windows.merge_windows``: weighted mean or median; one window is passed through untouched). An
output with NaN/Inf is recomputed in fp32 (and counted); still non-finite is an error. The image
stays on the device from upload to the merged result, which is copied to the host once.

Before the first image: the tile batch of each window (``tiling.auto_batch``) and, where ``compile``
says so, ``torch.compile`` of each model for those fixed tile batches (the last, shorter batch of an
image is padded up to it); the first image is run once untimed to compile and warm up, and that
time is ``Timing.compile_seconds``.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.config import CompileMode, Config, InferConfig, SectionView, view_of
from pipeline.core.errors import UserError
from pipeline.core.layout import RunLayout
from pipeline.core.runtime import (
    INFER_COMPILE,
    INFER_EAGER_SECONDS_PER_PIXEL,
    auto_compile,
    autocast,
    autocast_dtype,
    peak_memory,
    pick_device,
    precision_name,
)
from pipeline.inference.ensemble import MERGES, average_models
from pipeline.inference.memory import images_per_call
from pipeline.inference.tiling import Forward, TileError, run_tiles
from pipeline.inference.windows import (
    AUTO,
    Cut,
    Window,
    WindowPlan,
    check_weights,
    cut_geometry,
    merge_windows,
    model_unit,
    window_set,
)
from pipeline.models import arch_file
from pipeline.models.checkpoint import CheckpointError, load_weights_file, model_from_checkpoint
from pipeline.models.table import Bicubic, autocast_cap, build_model, card_of, check_scale

COMPILE_MODES = typing.get_args(CompileMode)


@view_of(InferConfig)
class Settings(SectionView):
    """The inference settings an ablation varies (see ``InferConfig`` for their meaning and defaults)."""

    tta: int
    tile: int | str  # LR pixels, 0 = whole image, or "auto"
    stride: int
    windows: tuple[str, ...]
    window_weights: tuple[float, ...]
    tile_blend: str
    pad: int
    margin: int
    batch: int
    precision: str
    channels_last: bool
    merge: str
    compile: str

    def label(self) -> str:
        """Short text for tables: ``tta8 tile128/64 mean pad0 margin0 auto`` (``tta8 median ...``; windows
        ``tta8 windows0+64/32 ...``, weighted ``windows0+64/32@1,2 ...``; ``tileauto``)."""
        if self.windows:
            tiles = f"windows{self.window_text()}"
        else:
            tiles = "whole" if self.tile == 0 else "tileauto" if self.tile == AUTO else f"tile{self.tile}/{self.stride}"
        merge = "" if self.merge == "mean" else f" {self.merge}"
        return f"tta{self.tta}{merge} {tiles} {self.tile_blend} pad{self.pad} margin{self.margin} {self.precision}"

    def window_text(self) -> str:
        """``infer.windows`` as one word: ``0+64/32`` (``0+64/32@1,2`` weighted); '' without windows."""
        weights = "@" + ",".join(f"{w:g}" for w in self.window_weights) if self.window_weights else ""
        return "+".join(self.windows) + weights if self.windows else ""

    def window_list(self) -> list[Window]:
        """The windows every image runs through (``infer.windows``, else the one of tile / stride)."""
        return window_set(self.tile, self.stride, self.windows)

    def weights(self) -> tuple[float, ...]:
        """One weight per window (equal when ``window_weights`` is empty)."""
        return self.window_weights or (1.0,) * len(self.window_list())


@dataclass
class Timing:
    """Accumulated while predicting; ``summary()`` is what ``timing.json`` holds."""

    device: str
    precision: str
    images: int = 0
    seconds: float = 0.0  # per-image work only: compilation and warm-up are in compile_seconds
    tiles: int = 0  # tile forwards: LR tiles x ensemble ways x models
    fp32_fallbacks: list[str] = field(default_factory=list)
    batch: int = 0
    peak_mib: float = 0.0
    compile: str = "off"  # the torch.compile mode that ran ('off' = eager)
    compile_seconds: float = 0.0
    windows: list[WindowTiming] = field(default_factory=list)  # per window, when infer.windows or auto is used

    def summary(self) -> dict[str, Any]:
        extra = {"windows": [w.summary() for w in self.windows]} if self.windows else {}
        return {
            "images": self.images,
            "seconds_total": round(self.seconds, 4),
            "seconds_per_image": round(self.seconds / max(self.images, 1), 4),
            "tiles_per_second": round(self.tiles / self.seconds, 3) if self.seconds else 0.0,
            "tile_forwards": self.tiles,
            "batch": self.batch,
            "peak_memory_mib": round(self.peak_mib, 1),
            "device": self.device,
            "precision": self.precision,
            "compile": self.compile,
            "compile_seconds": round(self.compile_seconds, 3),
            "fp32_fallbacks": self.fp32_fallbacks,
            **extra,
        }


@dataclass
class WindowTiming:
    """One window's share of ``Timing``: its seconds, tile forwards and what ``auto`` resolved to."""

    window: str
    weight: float
    seconds: float = 0.0
    tiles: int = 0  # tile forwards: LR tiles x ensemble ways x models
    resolved: set[str] = field(default_factory=set)  # "whole" or "TILE/STRIDE", per image size
    why: set[str] = field(default_factory=set)  # auto: what it chose and why, per image size

    def summary(self) -> dict[str, Any]:
        return {"window": self.window, "weight": self.weight, "seconds_total": round(self.seconds, 4),
                "tile_forwards": self.tiles, "tiles": sorted(self.resolved),
                **({"auto": sorted(self.why)} if self.why else {})}


def check_settings(settings: Settings) -> None:
    """Settings errors as one-line ``UserError`` before any model runs."""
    s = settings
    if s.tta not in (1, 2, 4, 8):
        raise UserError(f"infer.tta={s.tta}: choose 1, 2, 4 or 8")
    if s.tile != AUTO and not (isinstance(s.tile, int) and not isinstance(s.tile, bool)):
        raise UserError(f"infer.tile={s.tile}: a side in LR pixels, 0 (whole image) or {AUTO}")
    if (s.tile != AUTO and s.tile < 0) or s.pad < 0 or s.margin < 0 or s.batch < 0:
        raise UserError(f"infer.tile/pad/margin/batch must be >= 0 (got {s.tile}/{s.pad}/{s.margin}/{s.batch})")
    if s.merge not in MERGES:
        raise UserError(f"infer.merge={s.merge}: choose {' or '.join(MERGES)}")
    if not s.windows and s.tile != AUTO:
        if s.tile and not 0 < s.stride <= s.tile:
            raise UserError(f"infer.stride={s.stride} must be in 1..infer.tile ({s.tile}); a larger stride leaves gaps")
        if s.tile and 2 * s.margin > s.tile - s.stride:
            raise UserError(f"infer.margin={s.margin} leaves pixels uncovered: 2 x margin must be <= tile - stride "
                            f"({s.tile} - {s.stride})")
    for w in s.window_list() if s.windows else []:  # parsed here: a bad entry is a one-line error
        if isinstance(w.tile, int) and w.tile and 2 * s.margin > w.tile - w.stride:
            raise UserError(f"infer.margin={s.margin} leaves pixels uncovered in window {w.spec} of infer.windows: "
                            f"2 x margin must be <= tile - stride")
    check_weights(s.window_weights, s.windows, s.merge)
    if s.compile not in COMPILE_MODES:
        raise UserError(f"infer.compile={s.compile}: choose {', '.join(COMPILE_MODES)}")


def is_parameter_free(models: Sequence[nn.Module]) -> bool:
    return all(sum(p.numel() for p in m.parameters()) == 0 for m in models)


def inference_dtype(models: Sequence[nn.Module], device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype ``models`` run in for a precision setting (None = fp32): none for parameter-free
    models, and fp16-unsafe architectures kept in bf16 / fp32 (``models.autocast_cap``)."""
    if is_parameter_free(models):
        return None
    return autocast_cap(models, autocast_dtype(device, precision), device)


def compile_choice(setting: str, device: torch.device, lr_pixels: int) -> str:
    """``infer.compile``: ``runtime.auto_compile`` for ``lr_pixels`` (images x tiles x ways x tile area)
    through each model; at RRDB's measured pace compiling pays after ~86 contest images of 49 x 8 tiles,
    so ``auto`` waits for ~170 (COMPILE_MARGIN)."""
    return auto_compile(setting, device, lr_pixels * INFER_EAGER_SECONDS_PER_PIXEL, INFER_COMPILE)


def _forward(models: Sequence[nn.Module], settings: Settings, device: torch.device,
             dtype: torch.dtype | None, compile_mode: str = "off") -> Forward:
    """A tile batch (N,3,h,w) -> the models' merged self-ensembles (N,3,4h,4w), fp32."""
    graphs = compile_mode == "reduce-overhead" and device.type == "cuda"

    def wrap(model: nn.Module) -> Forward:
        # dynamic=False: one specialised graph per tile batch shape (run_tiles keeps it fixed).
        net = model if compile_mode == "off" else torch.compile(model, mode=compile_mode, dynamic=False)

        def run(x: torch.Tensor) -> torch.Tensor:
            if settings.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                raw = net(x)
                out = raw.float()
                # CUDA graphs overwrite their output buffer on the next replay: keep a copy.
                return out.clone() if graphs and out is raw else out
        return run
    fns = [wrap(m) for m in models]
    # (N,3,h,w) tiles x tta ways in calls of at most ``images_per_call`` images (the measured pixels per call)
    return lambda x: average_models(fns, x, settings.tta, settings.merge, images_per_call(x.shape[-2] * x.shape[-1],
                                                                                           device))


def _to_tensor(img: np.ndarray, device: torch.device, name: str) -> torch.Tensor:
    if img.ndim != 3 or img.shape[2] != 3:
        raise UserError(f"{name}: expected an (H,W,3) RGB image, got shape {img.shape}")
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1).to(device)  # (3,H,W)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iter_predict(models: Sequence[nn.Module], items: Iterable[tuple[str, np.ndarray]], settings: Settings,
                 device: torch.device, timing: Timing, total_images: int | None = None,
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, sr)`` per ``(name, lr)``: lr (H,W,3) float in [0,1] -> sr (4H,4W,3) fp32, unclamped.

    ``total_images`` (default: ``len(items)`` when it has one, else 1) is what ``compile=auto``
    weighs the compile time against; the first image's geometry stands for the others.
    """
    check_settings(settings)
    free = is_parameter_free(models)
    dtype = inference_dtype(models, device, settings.precision)
    timing.precision = precision_name(dtype)
    if total_images is None:
        total_images = len(items) if isinstance(items, Sized) else 1
    for m in models:
        m.eval().to(device)
        if settings.channels_last and not isinstance(m, Bicubic):
            m.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a few fixed tile shapes: pick the fastest kernels once
    eager = _forward(models, settings, device, dtype)
    plan = WindowPlan(settings.window_list(), model_unit(models), eager, device, settings.tta, settings.pad,
                      settings.margin, settings.batch)
    if settings.windows or any(w.tile == AUTO for w in plan.windows):
        timing.windows = [WindowTiming(w.spec, weight) for w, weight in zip(plan.windows, settings.weights())]
    fast: Forward | None = None  # what tiles go through: the eager forward or the compiled one
    for name, img in items:
        lr = _to_tensor(img, device, name)
        with torch.inference_mode():
            cuts = plan(lr)
            if fast is None:
                pixels = 0
                for cut in cuts:
                    tiles, shape = cut_geometry(*cut, settings.pad, lr)
                    pixels += total_images * tiles * settings.tta * shape[0] * shape[1]
                timing.compile = "off" if free else compile_choice(settings.compile, device, pixels)
                fast = eager
                if timing.compile != "off":
                    fast = _forward(models, settings, device, dtype, timing.compile)
                    begin = time.perf_counter()
                    _predict_image(fast, lr, cuts, plan.batches, settings, name, True, device)  # compiles every shape
                    _sync(device)
                    timing.compile_seconds += time.perf_counter() - begin
        start = time.perf_counter()
        with torch.inference_mode():
            sr, stats = _predict_image(fast, lr, cuts, plan.batches, settings, name, timing.compile != "off", device)
            if not bool(torch.isfinite(sr).all()) and dtype is not None:
                timing.fp32_fallbacks.append(name)  # bf16/fp16 overflowed: this image again, eager fp32
                fp32 = _forward(models, settings, device, None)
                sr, again = _predict_image(fp32, lr, cuts, plan.batches, settings, name, False, device)
                stats = [(a + b, s + t) for (a, s), (b, t) in zip(stats, again)]
            if not bool(torch.isfinite(sr).all()):
                raise UserError(f"{name}: the model produced NaN/Inf even in fp32 (broken weights?)")
            out = sr.permute(1, 2, 0).cpu().numpy()  # (3,4H,4W) -> (4H,4W,3): the image's one copy to the host
        _sync(device)
        timing.seconds += time.perf_counter() - start
        timing.images += 1
        forwards = settings.tta * len(models)
        timing.tiles += sum(tiles for tiles, _ in stats) * forwards
        timing.batch = max(plan.batches[cut] for cut in cuts)
        for record, cut, (tiles, seconds) in zip(timing.windows, cuts, stats):
            record.seconds += seconds
            record.tiles += tiles * forwards
            record.resolved.add("whole" if cut[0] == 0 else f"{cut[0]}/{cut[1]}")
            if record.window == AUTO:
                record.why.add(plan.why(lr))
        yield name, out


def _predict_image(fn: Forward, lr: torch.Tensor, cuts: list[Cut], batches: dict[Cut, int], settings: Settings,
                   name: str, fixed_batch: bool, device: torch.device) -> tuple[torch.Tensor, list[tuple[int, float]]]:
    """The SR (3,4H,4W) of ``lr`` merged over its windows (``windows.merge_windows``: one after another,
    a running merge), and (LR tiles, seconds) per window; ``batches`` keeps the batch each geometry ended with."""
    stats: list[tuple[int, float]] = []

    def outputs() -> Iterator[torch.Tensor]:
        for cut in cuts:
            begin = time.perf_counter()
            sr, tiles, batches[cut] = _predict_one(fn, lr, *cut, settings, batches[cut], name, fixed_batch)
            _sync(device)
            stats.append((tiles, time.perf_counter() - begin))
            yield sr

    return merge_windows(outputs(), settings.weights(), settings.merge), stats


def _predict_one(fn: Forward, lr: torch.Tensor, tile: int, stride: int, settings: Settings, batch: int, name: str,
                 fixed_batch: bool) -> tuple[torch.Tensor, int, int]:
    try:
        sr, report = run_tiles(fn, lr, tile, stride, settings.tile_blend, batch, settings.pad, settings.margin,
                               fixed_batch)
    except UserError as exc:
        raise type(exc)(f"{name}: {exc}") from exc
    except TileError as exc:
        raise TileError(f"{name}: {exc}") from exc
    return sr, report.tiles, report.batch


def predict_images(models: Sequence[nn.Module], lr_images: Sequence[np.ndarray], settings: Settings,
                   device: torch.device | None = None, names: Sequence[str] | None = None,
                   total_images: int | None = None) -> tuple[list[np.ndarray], Timing]:
    """SR float images (4H,4W,3), unclamped, for (H,W,3) LR floats in [0,1]; plus their ``Timing``.

    ``total_images`` (default: these images) is the count ``compile=auto`` decides for.
    """
    device = device or pick_device()
    names = list(names) if names is not None else [f"image {i}" for i in range(len(lr_images))]
    timing = Timing(device=str(device), precision="")
    total = len(lr_images) if total_images is None else total_images
    with peak_memory(device) as mem:
        out = [sr for _name, sr in iter_predict(models, zip(names, lr_images), settings, device, timing, total)]
    timing.peak_mib = mem["peak_mib"]
    return out, timing


# ---------------------------------------------------------------------------------------------
# Which models a config asks for.


def checkpoint_paths(cfg: Config) -> list[Path]:
    """The run's ``infer.checkpoint`` (or its last ``infer.last_k`` history files), then each extra run's."""
    root = Path(cfg.paths.models)
    run = RunLayout(root, cfg.run)
    if cfg.infer.last_k > 0:
        history = run.history_files()
        if len(history) < cfg.infer.last_k:
            raise UserError(f"infer.last_k={cfg.infer.last_k} but {run.history_dir} holds "
                            f"{len(history)} checkpoint(s); train keeps train.keep_last of them")
        paths = history[-cfg.infer.last_k:]
    else:
        paths = [run.checkpoint(cfg.infer.checkpoint)]
    paths += [RunLayout(root, extra).checkpoint(cfg.infer.checkpoint) for extra in cfg.infer.runs]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: checkpoint not found (train run {p.parent.name!r} first, or use model.name=bicubic)")
    return paths


def weights_file_models(path: str | Path, cfg: Config) -> tuple[list[nn.Module], str]:
    """What ``load_models`` runs for a weights file (infer --weights, or model.pretrained without a run):
    the one model in it, and a description for tables. What was detected is printed."""
    if cfg.model.weights and (cfg.infer.runs or cfg.infer.last_k):
        raise CheckpointError(f"model.weights={path} runs that file alone; drop infer.runs / infer.last_k")
    model = load_weights_file(path, cfg.model.name, cfg.infer.ema, arch_file.spec_of(cfg.model))
    card = card_of(model)
    if card.note:
        print(card.note)
    return [model.eval()], f"{card.arch} ({Path(path).name})"


def load_models(cfg: Config) -> tuple[list[nn.Module], str]:
    """Models to average and a description for tables: bicubic, bare pretrained weights, or checkpoints."""
    check_scale(cfg.data.scale)
    if cfg.model.weights:  # infer --weights FILE: that file alone, architecture detected (or model.arch's)
        return weights_file_models(cfg.model.weights, cfg)
    if cfg.model.name == "bicubic":
        return [build_model("bicubic")], "bicubic"
    if cfg.model.pretrained and not cfg.infer.runs and cfg.infer.last_k == 0 and not RunLayout(
            Path(cfg.paths.models), cfg.run).checkpoint(cfg.infer.checkpoint).is_file():
        return weights_file_models(cfg.model.pretrained, cfg)
    models, archs = [], []
    for path in checkpoint_paths(cfg):
        model, meta = model_from_checkpoint(path, cfg.infer.ema)
        models.append(model)
        archs.append(str(meta.get("arch", "?")))
    what = f"last{cfg.infer.last_k}" if cfg.infer.last_k else cfg.infer.checkpoint
    desc = "+".join(dict.fromkeys(archs)) + f" ({len(models)}x {what} {'ema' if cfg.infer.ema else 'params'})"
    return models, desc
