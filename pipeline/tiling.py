"""Tiled inference: pad, cut overlapping tiles, run them in batches, merge with weights, crop.

``tile_forward`` is a pure function of its arguments: no state survives between calls, and a
failed batch never leaves partial results behind (tiles are added to the output only after
their whole batch succeeded). The pieces:

- ``pad`` LR pixels of reflection on all four sides (0 = none), applied identically with and
  without tiles, so edge pixels can see context like interior ones and ``tile=0`` computes the
  same function as any tiling.
- The grid (``tile_grid``): tiles of ``tile`` x ``tile`` every ``stride`` pixels, the last one
  flush with the far edge, so any image size is covered without extra padding. A 512 image with
  tile 128 / stride 64 gives 7 x 7 = 49 tiles, the reference team's setting.
- Weights: ``mean`` (every covering tile counts equally, the reference) or ``hann`` (a separable
  sin^2 window with a floor of ``HANN_FLOOR``, so no pixel ever ends with zero weight).
  ``margin`` LR pixels along tile sides that face another tile get weight 0: with a margin at
  least the model's receptive radius (and 2 * margin <= tile - stride, which keeps every pixel
  covered) the tiled output equals the whole-image output to float precision.
- Batches: ``batch`` tiles per call (0 = ``CPU_BATCH``; ``auto_batch`` sizes it to the device).
  Out of memory halves the batch and retries the same tiles; a single tile that does not fit
  stops with ``TileMemoryError``. All accumulation is fp32 on the output's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.errors import UserError

Forward = Callable[[torch.Tensor], torch.Tensor]  # (N,C,h,w) -> (N,C,scale*h,scale*w)

BLENDS = ("mean", "hann")
HANN_FLOOR = 0.02  # weight at a tile's outermost pixel, relative to its centre
CPU_BATCH = 4  # tiles per call when the caller gives no batch and no auto_batch
# LR pixels per forward on the CPU (tiles x ensemble ways x tile area). bench/infer_speed.py on a
# 2-core AVX2 EPYC (BENCHMARKS.md): 49 tiles of 32^2 without ensemble ran 2.7x faster in batches
# of 32 than of 4; with 8 ways, more than ~32k pixels per call was no faster overall (+-30% by
# model) and took 3x the memory. A 128^2 tile x 8 ways is 131k pixels: one tile per call.
CPU_PIXELS = 32 * 32 * 32


class TileError(RuntimeError):
    """A tile's forward pass failed; the message says which tile of which image size."""


class TileMemoryError(UserError):
    """A single tile does not fit in memory: the user must lower the tile size."""


@dataclass(frozen=True)
class TileReport:
    """What a ``run_tiles`` call did: tiles run, the batch that worked, the tile shape."""

    tiles: int
    batch: int
    tile_shape: tuple[int, int]


def _axis_starts(n: int, tile: int, stride: int) -> list[int]:
    if tile >= n:
        return [0]
    starts = list(range(0, n - tile + 1, stride))
    if starts[-1] != n - tile:
        starts.append(n - tile)  # flush with the far edge: covered without padding
    return starts


def effective_tile(height: int, width: int, tile: int, stride: int) -> tuple[int, int]:
    """The square tile side and stride used on a height x width image.

    A tile larger than the image shrinks to the shorter side (tiles stay square, so every
    dihedral transform of a tile batch keeps its shape); the stride shrinks with it so the
    overlap ``tile - stride`` is kept, up to half the shrunk tile.
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive here, got {tile}")
    if not 0 < stride <= tile:
        raise ValueError(f"stride must be in 1..tile ({tile}), got {stride}: a larger stride leaves gaps")
    side = min(tile, height, width)
    if side == tile:
        return tile, stride
    return side, side - min(tile - stride, side // 2)


def tile_grid(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the tiles covering a height x width image, row by row.

    ``tile=0`` is the whole image: one tile at (0, 0).
    """
    if tile == 0:
        return [(0, 0)]
    side, step = effective_tile(height, width, tile, stride)
    return [(y, x) for y in _axis_starts(height, side, step) for x in _axis_starts(width, side, step)]


def window_1d(n: int, blend: str, cut_start: int = 0, cut_end: int = 0, device: torch.device | str = "cpu",
              ) -> torch.Tensor:
    """Weights of n output pixels along one tile side; ``cut_*`` pixels at either end get 0."""
    if blend == "mean":
        w = torch.ones(n, dtype=torch.float32, device=device)
    elif blend == "hann":
        # sin^2 over pixel centres, lifted so the outermost pixels keep HANN_FLOOR of the peak.
        pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        w = (HANN_FLOOR + (1 - HANN_FLOOR) * torch.sin(math.pi * pos) ** 2).float().to(device)
    else:
        raise ValueError(f"unknown blend {blend!r}; choose from {', '.join(BLENDS)}")
    if cut_start:
        w[:cut_start] = 0
    if cut_end:
        w[n - cut_end:] = 0
    return w


def _reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """(1,C,H,W) -> (1,C,H+2p,W+2p); reflection needs p < side, else the edge is repeated."""
    if pad == 0:
        return x
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    return F.pad(x, (pad, pad, pad, pad), mode=mode)


def is_oom(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's failure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_tiles(fn: Forward, lr: torch.Tensor, tile: int, stride: int, blend: str = "mean", batch: int = 0,
              pad: int = 0, margin: int = 0) -> tuple[torch.Tensor, TileReport]:
    """``tile_forward`` that also reports the tile count and the batch size that fitted."""
    squeeze = lr.dim() == 3
    x = lr.unsqueeze(0) if squeeze else lr  # (C,H,W) -> (1,C,H,W)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"lr must be (C,H,W) or (1,C,H,W), got {tuple(lr.shape)}")
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r}; choose from {', '.join(BLENDS)}")
    if pad < 0 or margin < 0 or batch < 0 or tile < 0:
        raise ValueError(f"tile, batch, pad and margin must be >= 0 (got {tile}, {batch}, {pad}, {margin})")
    height, width = x.shape[-2:]
    x = _reflect_pad(x.float(), pad)  # (1,C,H,W) -> (1,C,H+2p,W+2p)
    hp, wp = x.shape[-2:]
    if tile == 0:
        th, tw, margin = hp, wp, 0
    else:
        th, step = effective_tile(hp, wp, tile, stride)
        tw = th
        if th < tile:  # an image smaller than the tile: shrink the margin with it
            margin = min(margin, (th - step) // 2)
        elif 2 * margin > th - step:
            raise ValueError(f"margin {margin} leaves pixels uncovered: 2 x margin must be <= tile - stride "
                             f"({th} - {step} on a {hp}x{wp} padded image)")
    corners = tile_grid(hp, wp, tile, stride)
    cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def windows(length: int, cut_start: int, cut_end: int) -> torch.Tensor:
        key = (length, cut_start, cut_end)
        if key not in cache:
            cache[key] = window_1d(length, blend, cut_start, cut_end, x.device)
        return cache[key]

    n = len(corners)
    size = batch or CPU_BATCH
    out: torch.Tensor | None = None
    wsum = torch.empty(0)
    scale = 0
    i = 0
    while i < n:
        chunk = corners[i:i + size]
        tiles = torch.cat([x[:, :, y:y + th, c:c + tw] for y, c in chunk])  # (N,C,th,tw)
        where = (f"tiles {i}..{i + len(chunk) - 1} of {n} ({th}x{tw} LR, first at y={chunk[0][0]} "
                 f"x={chunk[0][1]}) of a {height}x{width} image padded to {hp}x{wp}")
        try:
            pred = fn(tiles).float()
        except Exception as exc:
            if not is_oom(exc):
                raise TileError(f"{where}: {type(exc).__name__}: {exc}") from exc
            del tiles
            _free_cache(x.device)
            if size == 1:
                raise TileMemoryError(f"out of memory on a single tile ({where}, device {x.device}); "
                                      "lower infer.tile or use a smaller model") from exc
            size //= 2  # retry the same tiles: nothing from this batch was accumulated
            continue
        if out is None:  # the first batch tells the scale and channel count
            scale = max(1, pred.shape[-1] // tw)
            out = torch.zeros(1, pred.shape[1], hp * scale, wp * scale, dtype=torch.float32, device=pred.device)
            wsum = torch.zeros(1, 1, hp * scale, wp * scale, dtype=torch.float32, device=pred.device)
        expected = (len(chunk), out.shape[1], th * scale, tw * scale)
        if tuple(pred.shape) != expected:
            raise TileError(f"{where}: the model returned {tuple(pred.shape)}, expected {expected}")
        cut = margin * scale
        for k, (y, c) in enumerate(chunk):
            # A side is cut only where another tile lies beyond it, never at the image's edge.
            wy = windows(th * scale, cut * (y > 0), cut * (y + th < hp))
            wx = windows(tw * scale, cut * (c > 0), cut * (c + tw < wp))
            w = wy[:, None] * wx[None, :]  # (th*s,) x (tw*s,) -> (th*s, tw*s)
            ys, xs = slice(y * scale, (y + th) * scale), slice(c * scale, (c + tw) * scale)
            out[0, :, ys, xs] += pred[k] * w
            wsum[0, 0, ys, xs] += w
        del pred, tiles  # free this batch before the next forward allocates its own
        i += len(chunk)
    if bool((wsum <= 0).any()):  # cannot happen with the checks above; never return a hole
        raise TileError(f"zero-weight pixels after merging {n} tiles of {th}x{tw} on {hp}x{wp}")
    out = out / wsum
    p = pad * scale
    out = out[:, :, p:p + height * scale, p:p + width * scale]  # crop the padding: (1,C,sH,sW)
    return (out[0] if squeeze else out), TileReport(n, size, (th, tw))


def tile_forward(fn: Forward, lr: torch.Tensor, tile: int, stride: int, blend: str = "mean", batch: int = 0,
                 pad: int = 0, margin: int = 0) -> torch.Tensor:
    """Super-resolve ``lr`` (C,H,W) or (1,C,H,W) tile by tile; returns fp32 (C,sH,sW) / (1,C,sH,sW).

    ``fn`` maps a tile batch (N,C,h,w) to (N,C,sh,sw): a model, or a self-ensemble around one.
    """
    return run_tiles(fn, lr, tile, stride, blend, batch, pad, margin)[0]


def auto_batch(fn: Forward, channels: int, tile_shape: tuple[int, int], device: torch.device, limit: int,
               budget: float = 0.6, ways: int = 1) -> int:
    """Tiles per call: on a GPU, what fits in ``budget`` of the free memory; on the CPU, enough
    tiles for ``CPU_PIXELS`` LR pixels per forward, counting the ``ways`` copies an ensemble adds.

    On a GPU it measures the peak memory of one tile through ``fn`` (ensemble included) and
    divides. The out-of-memory retry in ``run_tiles`` stays as the safety net.
    """
    if device.type != "cuda":
        return max(1, min(limit, CPU_PIXELS // (max(1, ways) * tile_shape[0] * tile_shape[1])))
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        fn(torch.zeros(1, channels, *tile_shape, device=device))
    except Exception as exc:
        if is_oom(exc):
            raise TileMemoryError(f"out of memory on a single {tile_shape[0]}x{tile_shape[1]} tile on {device}; "
                                  "lower infer.tile or use a smaller model") from exc
        raise
    torch.cuda.synchronize(device)
    per_tile = max(1, torch.cuda.max_memory_allocated(device) - base)
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(limit, int(budget * free / per_tile)))
