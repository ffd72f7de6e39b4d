"""The inference core shared by ``infer`` and ``ablate``: models + LR images + settings -> SR images.

``predict_images(models, lr_images, settings)`` returns float RGB images (unclamped, fp32) and a
``Timing``; ``iter_predict`` is the streaming form ``infer`` uses so that each image is written
as soon as it is ready. Per image: tiles (``tiling.run_tiles``) whose batches go through every
model's self-ensemble (``ensemble.average_models``), all under autocast when the settings ask for
it; an output with NaN/Inf is recomputed in fp32 (and counted); still non-finite is an error.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import model_from_checkpoint, weights_file_models
from pipeline.config import Config, InferConfig
from pipeline.ensemble import average_models
from pipeline.errors import UserError
from pipeline.models import Bicubic, autocast_cap, build_model
from pipeline.runtime import autocast, autocast_dtype, peak_memory, pick_device, precision_name
from pipeline.tiling import Forward, TileError, auto_batch, effective_tile, run_tiles, tile_grid


@dataclass(frozen=True)
class Settings:
    """The inference settings an ablation varies (see ``InferConfig`` for their meaning)."""

    tta: int = 8
    tile: int = 128
    stride: int = 64
    blend: str = "hann"
    pad: int = 0
    margin: int = 0
    batch: int = 0
    precision: str = "auto"
    channels_last: bool = True

    @classmethod
    def from_config(cls, infer: InferConfig) -> Settings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dataclasses.asdict(infer).items() if k in names})

    def label(self) -> str:
        """Short text for tables: ``tta8 tile128/64 mean pad0 margin0 auto``."""
        tiles = "whole" if self.tile == 0 else f"tile{self.tile}/{self.stride}"
        return f"tta{self.tta} {tiles} {self.blend} pad{self.pad} margin{self.margin} {self.precision}"


@dataclass
class Timing:
    """Accumulated while predicting; ``summary()`` is what ``timing.json`` holds."""

    device: str
    precision: str
    images: int = 0
    seconds: float = 0.0
    tiles: int = 0  # tile forwards: LR tiles x ensemble ways x models
    fp32_fallbacks: list[str] = field(default_factory=list)
    batch: int = 0
    peak_mib: float = 0.0

    def summary(self) -> dict[str, Any]:
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
            "fp32_fallbacks": self.fp32_fallbacks,
        }


def validate(settings: Settings) -> None:
    """Settings errors as one-line ``UserError`` before any model runs."""
    s = settings
    if s.tta not in (1, 2, 4, 8):
        raise UserError(f"infer.tta={s.tta}: choose 1, 2, 4 or 8")
    if s.tile < 0 or s.pad < 0 or s.margin < 0 or s.batch < 0:
        raise UserError(f"infer.tile/pad/margin/batch must be >= 0 (got {s.tile}/{s.pad}/{s.margin}/{s.batch})")
    if s.tile and not 0 < s.stride <= s.tile:
        raise UserError(f"infer.stride={s.stride} must be in 1..infer.tile ({s.tile}); a larger stride leaves gaps")
    if s.tile and 2 * s.margin > s.tile - s.stride:
        raise UserError(f"infer.margin={s.margin} leaves pixels uncovered: 2 x margin must be <= tile - stride "
                        f"({s.tile} - {s.stride})")


def is_parameter_free(models: Sequence[nn.Module]) -> bool:
    return all(sum(p.numel() for p in m.parameters()) == 0 for m in models)


def _forward(models: Sequence[nn.Module], settings: Settings, device: torch.device,
             dtype: torch.dtype | None) -> Forward:
    """A tile batch (N,3,h,w) -> mean over models of their self-ensembles (N,3,4h,4w), fp32."""
    def wrap(model: nn.Module) -> Forward:
        def run(x: torch.Tensor) -> torch.Tensor:
            if settings.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                return model(x).float()
        return run
    fns = [wrap(m) for m in models]
    return lambda x: average_models(fns, x, settings.tta)


def _to_tensor(img: np.ndarray, device: torch.device, name: str) -> torch.Tensor:
    if img.ndim != 3 or img.shape[2] != 3:
        raise UserError(f"{name}: expected an (H,W,3) RGB image, got shape {img.shape}")
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1).to(device)  # (3,H,W)


def iter_predict(models: Sequence[nn.Module], items: Iterable[tuple[str, np.ndarray]], settings: Settings,
                 device: torch.device, timing: Timing) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, sr)`` per ``(name, lr)``: lr (H,W,3) float in [0,1] -> sr (4H,4W,3) fp32, unclamped."""
    validate(settings)
    dtype = None if is_parameter_free(models) else autocast_dtype(device, settings.precision)
    dtype = autocast_cap(models, dtype, device)  # fp16-unsafe architectures stay in bf16/fp32
    timing.precision = precision_name(dtype)
    batch = settings.batch
    for m in models:
        m.eval().to(device)
        if settings.channels_last and not isinstance(m, Bicubic):
            m.to(memory_format=torch.channels_last)
    for name, img in items:
        lr = _to_tensor(img, device, name)
        start = time.perf_counter()
        with torch.inference_mode():
            if batch == 0:
                batch = _auto_batch(models, settings, device, dtype, lr)
            sr, tiles, batch = _predict_one(models, lr, settings, device, dtype, batch, name)
            if not bool(torch.isfinite(sr).all()) and dtype is not None:
                timing.fp32_fallbacks.append(name)  # bf16/fp16 overflowed: this image again in fp32
                sr, tiles_fp32, batch = _predict_one(models, lr, settings, device, None, batch, name)
                tiles += tiles_fp32
            if not bool(torch.isfinite(sr).all()):
                raise UserError(f"{name}: the model produced NaN/Inf even in fp32 (broken weights?)")
            out = sr.permute(1, 2, 0).cpu().numpy()  # (3,4H,4W) -> (4H,4W,3)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timing.seconds += time.perf_counter() - start
        timing.images += 1
        timing.tiles += tiles * settings.tta * len(models)
        timing.batch = batch
        yield name, out


def _auto_batch(models: Sequence[nn.Module], settings: Settings, device: torch.device, dtype: torch.dtype | None,
                lr: torch.Tensor) -> int:
    if settings.tile == 0:
        return 1
    h, w = lr.shape[-2] + 2 * settings.pad, lr.shape[-1] + 2 * settings.pad
    n = len(tile_grid(h, w, settings.tile, settings.stride))
    side = effective_tile(h, w, settings.tile, settings.stride)[0]
    return auto_batch(_forward(models, settings, device, dtype), 3, (side, side), device, n, ways=settings.tta)


def _predict_one(models: Sequence[nn.Module], lr: torch.Tensor, settings: Settings, device: torch.device,
                 dtype: torch.dtype | None, batch: int, name: str) -> tuple[torch.Tensor, int, int]:
    fn = _forward(models, settings, device, dtype)
    try:
        sr, report = run_tiles(fn, lr, settings.tile, settings.stride, settings.blend, batch,
                               settings.pad, settings.margin)
    except UserError as exc:
        raise type(exc)(f"{name}: {exc}") from exc
    except TileError as exc:
        raise TileError(f"{name}: {exc}") from exc
    return sr, report.tiles, report.batch


def predict_images(models: Sequence[nn.Module], lr_images: Sequence[np.ndarray], settings: Settings,
                   device: torch.device | None = None, names: Sequence[str] | None = None,
                   ) -> tuple[list[np.ndarray], Timing]:
    """SR float images (4H,4W,3), unclamped, for (H,W,3) LR floats in [0,1]; plus their ``Timing``."""
    device = device or pick_device()
    names = list(names) if names is not None else [f"image {i}" for i in range(len(lr_images))]
    timing = Timing(device=str(device), precision="")
    with peak_memory(device) as mem:
        out = [sr for _name, sr in iter_predict(models, zip(names, lr_images), settings, device, timing)]
    timing.peak_mib = mem["peak_mib"]
    return out, timing


# ---------------------------------------------------------------------------------------------
# Which models a config asks for.


def checkpoint_paths(cfg: Config) -> list[Path]:
    """The run's ``infer.checkpoint`` (or its last ``infer.last_k`` history files), then each extra run's."""
    root = Path(cfg.paths.models)
    if cfg.infer.last_k > 0:
        history = sorted((root / cfg.run / "history").glob("step_*.pth"))
        if len(history) < cfg.infer.last_k:
            raise UserError(f"infer.last_k={cfg.infer.last_k} but {root / cfg.run / 'history'} holds "
                            f"{len(history)} checkpoint(s); train keeps train.keep_last of them")
        paths = history[-cfg.infer.last_k:]
    else:
        paths = [root / cfg.run / f"{cfg.infer.checkpoint}.pth"]
    paths += [root / run / f"{cfg.infer.checkpoint}.pth" for run in cfg.infer.runs]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: checkpoint not found (train run {p.parent.name!r} first, or use model.name=bicubic)")
    return paths


def load_models(cfg: Config) -> tuple[list[nn.Module], str]:
    """Models to average and a description for tables: bicubic, bare pretrained weights, or checkpoints."""
    if cfg.model.weights:  # infer --weights FILE: that file alone, architecture detected
        return weights_file_models(cfg.model.weights, cfg)
    if cfg.model.name == "bicubic":
        return [build_model("bicubic")], "bicubic"
    if cfg.model.pretrained and not cfg.infer.runs and cfg.infer.last_k == 0 and not (
            Path(cfg.paths.models) / cfg.run / f"{cfg.infer.checkpoint}.pth").is_file():
        return weights_file_models(cfg.model.pretrained, cfg)
    models, archs = [], []
    for path in checkpoint_paths(cfg):
        model, meta = model_from_checkpoint(path, cfg.infer.weights)
        models.append(model)
        archs.append(str(meta.get("arch", "?")))
    what = f"last{cfg.infer.last_k}" if cfg.infer.last_k else cfg.infer.checkpoint
    desc = "+".join(dict.fromkeys(archs)) + f" ({len(models)}x {what} {cfg.infer.weights})"
    return models, desc
