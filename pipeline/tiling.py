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
- Batches: ``batch`` tiles per call (0 = ``CPU_BATCH``; ``auto_batch`` sizes it to the device: LR
  pixels per forward, and on CUDA also a memory cap from a one-tile probe). Out of memory halves
  the batch and retries the same tiles; a single tile that does not fit stops with
  ``TileMemoryError``. ``fixed_batch`` pads the last, shorter batch up to the batch size (the
  padding rows are dropped after the forward), so a compiled model only ever sees one shape.
- Everything stays on the input's device: tiles are cut there, the weight maps of a geometry are
  built once (``merge_plan``, cached) and the whole image is accumulated in fp32 there; the
  caller copies the finished image to the host once.
"""

from __future__ import annotations

import functools
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
# LR pixels per forward on CUDA. One H100, RRDB, 512 LR, 49 tiles of 128^2 x 8 ways, bf16 eager
# (shared/measurements/h100-2026-11-23/rrdb_infer_levers.txt): 1 tile per forward (131k px)
# 2.29 s/image at 1.3 GiB, 4 tiles (524k px) 2.05 s at 4.5 GiB, the best eager point measured.
# The previous rule (fill 60% of free memory) chose ~70 GB batches that were slower than 1 tile
# for every model (EDSR 2.87 s vs 0.41 s, infer_speed_cuda.csv): past a few hundred thousand
# pixels the card is already busy and a larger batch only adds memory traffic.
CUDA_PIXELS = 4 * 8 * 128 * 128
# Memory cap on CUDA: the batch times the measured peak of one tile (ensemble included) must stay
# within min(CUDA_MEMORY_CAP, CUDA_FREE_SHARE x free memory). 8 GiB is issue 8's ceiling for the
# contest geometry and leaves a 24 GB card room; the share keeps a busy or small card safe.
CUDA_MEMORY_CAP = 8 * 2**30
CUDA_FREE_SHARE = 0.5


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


@dataclass(frozen=True)
class MergePlan:
    """The merge weights of one geometry: a few distinct tile maps, which tile uses which, their sum."""

    maps: torch.Tensor  # (K,1,th*s,tw*s): the distinct weight maps (K <= 9: edge/interior per side)
    index: torch.Tensor  # (n,) long, on the maps' device: the map of each tile, in grid order
    wsum: torch.Tensor  # (1,1,hp*s,wp*s): summed weights (never zero: checked when built)


@functools.lru_cache(maxsize=16)
def merge_plan(hp: int, wp: int, tile: int, stride: int, blend: str, margin: int, scale: int,
               device: torch.device) -> MergePlan:
    """Weights of every tile of a padded hp x wp image, built once per geometry instead of per tile.

    ``margin`` is the already-resolved margin in LR pixels (``run_tiles`` shrinks it for small
    images). A side is cut only where another tile lies beyond it, never at the image's edge.
    """
    corners = tile_grid(hp, wp, tile, stride)
    th, tw = (hp, wp) if tile == 0 else (effective_tile(hp, wp, tile, stride)[0],) * 2
    cut = margin * scale
    keys: dict[tuple[bool, bool, bool, bool], int] = {}
    maps, index = [], []
    wsum = torch.zeros(1, 1, hp * scale, wp * scale, dtype=torch.float32, device=device)
    for y, c in corners:
        key = (y > 0, y + th < hp, c > 0, c + tw < wp)
        if key not in keys:
            wy = window_1d(th * scale, blend, cut * key[0], cut * key[1], device)
            wx = window_1d(tw * scale, blend, cut * key[2], cut * key[3], device)
            keys[key] = len(maps)
            maps.append(wy[:, None] * wx[None, :])  # (th*s,) x (tw*s,) -> (th*s, tw*s)
        index.append(keys[key])
        wsum[0, 0, y * scale:(y + th) * scale, c * scale:(c + tw) * scale] += maps[keys[key]]
    if bool((wsum <= 0).any()):  # cannot happen with run_tiles' checks; never return a hole
        raise TileError(f"zero-weight pixels after merging {len(corners)} tiles of {th}x{tw} on {hp}x{wp}")
    stacked = torch.stack(maps)[:, None]  # K x (th*s, tw*s) -> (K,1,th*s,tw*s)
    return MergePlan(stacked, torch.tensor(index, dtype=torch.long, device=device), wsum)


def run_tiles(fn: Forward, lr: torch.Tensor, tile: int, stride: int, blend: str = "mean", batch: int = 0,
              pad: int = 0, margin: int = 0, fixed_batch: bool = False) -> tuple[torch.Tensor, TileReport]:
    """``tile_forward`` that also reports the tile count and the batch size that fitted.

    ``fixed_batch``: pad a shorter last batch with copies of its last tile up to the batch size
    and drop their outputs, so ``fn`` is always called with one shape (for a compiled model).
    """
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
    n = len(corners)
    size = batch or CPU_BATCH
    out: torch.Tensor | None = None
    plan: MergePlan | None = None
    scale = 0
    i = 0
    while i < n:
        chunk = corners[i:i + size]
        tiles = torch.cat([x[:, :, y:y + th, c:c + tw] for y, c in chunk])  # (N,C,th,tw)
        if fixed_batch and len(chunk) < size:  # (N,C,th,tw) -> (size,C,th,tw): one shape for every call
            tiles = torch.cat([tiles, tiles[-1:].expand(size - len(chunk), -1, -1, -1)])
        where = (f"tiles {i}..{i + len(chunk) - 1} of {n} ({th}x{tw} LR, first at y={chunk[0][0]} "
                 f"x={chunk[0][1]}) of a {height}x{width} image padded to {hp}x{wp}")
        try:
            pred = fn(tiles).float()[:len(chunk)]  # padding rows, if any, dropped: (N,C,s*th,s*tw)
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
            plan = merge_plan(hp, wp, tile, stride, blend, margin, scale, pred.device)
        assert plan is not None
        expected = (len(chunk), out.shape[1], th * scale, tw * scale)
        if tuple(pred.shape) != expected:
            raise TileError(f"{where}: the model returned {tuple(pred.shape)}, expected {expected}")
        weighted = pred * plan.maps[plan.index[i:i + len(chunk)]]  # (N,C,sh,sw) x (N,1,sh,sw)
        for k, (y, c) in enumerate(chunk):
            out[0, :, y * scale:(y + th) * scale, c * scale:(c + tw) * scale] += weighted[k]
        del pred, tiles, weighted  # free this batch before the next forward allocates its own
        i += len(chunk)
    assert out is not None and plan is not None
    out = out / plan.wsum
    p = pad * scale
    out = out[:, :, p:p + height * scale, p:p + width * scale]  # crop the padding: (1,C,sH,sW)
    return (out[0] if squeeze else out), TileReport(n, size, (th, tw))


def tile_forward(fn: Forward, lr: torch.Tensor, tile: int, stride: int, blend: str = "mean", batch: int = 0,
                 pad: int = 0, margin: int = 0) -> torch.Tensor:
    """Super-resolve ``lr`` (C,H,W) or (1,C,H,W) tile by tile; returns fp32 (C,sH,sW) / (1,C,sH,sW).

    ``fn`` maps a tile batch (N,C,h,w) to (N,C,sh,sw): a model, or a self-ensemble around one.
    """
    return run_tiles(fn, lr, tile, stride, blend, batch, pad, margin)[0]


def batch_bound(tiles: int, ways: int, tile_shape: tuple[int, int], pixels: int, per_tile_bytes: int = 0,
                budget_bytes: int = 0) -> int:
    """Tiles per forward: at most ``tiles``, at most ``pixels`` LR pixels (tiles x ways x tile area)
    and, when ``per_tile_bytes`` is given, at most ``budget_bytes`` of measured memory; at least 1."""
    by_pixels = pixels // (max(1, ways) * tile_shape[0] * tile_shape[1])
    by_memory = budget_bytes // per_tile_bytes if per_tile_bytes > 0 else by_pixels
    return max(1, min(tiles, by_pixels, by_memory))


def memory_budget(free_bytes: int) -> int:
    """Bytes a tile batch may take on CUDA: ``CUDA_MEMORY_CAP``, or less on a small or busy card."""
    return int(min(CUDA_MEMORY_CAP, CUDA_FREE_SHARE * free_bytes))


Probe = Callable[[Forward, int, tuple[int, int], torch.device], tuple[int, int]]


def probe_tile_memory(fn: Forward, channels: int, tile_shape: tuple[int, int], device: torch.device,
                      ) -> tuple[int, int]:
    """(peak bytes of one tile through ``fn``, ensemble included; free bytes) measured on a CUDA device."""
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
    return per_tile, torch.cuda.mem_get_info(device)[0]


def auto_batch(fn: Forward, channels: int, tile_shape: tuple[int, int], device: torch.device, limit: int,
               ways: int = 1, probe: Probe = probe_tile_memory) -> int:
    """Tiles per call for ``limit`` tiles of ``tile_shape`` through ``fn`` (a ``ways``-fold ensemble).

    CPU: ``CPU_PIXELS`` LR pixels per forward. CUDA: ``CUDA_PIXELS`` per forward and no more than
    ``memory_budget`` of memory, from one tile's measured peak (``probe``), whichever is smaller.
    The out-of-memory halving in ``run_tiles`` stays as the safety net.
    """
    if device.type != "cuda":
        return batch_bound(limit, ways, tile_shape, CPU_PIXELS)
    per_tile, free = probe(fn, channels, tile_shape, device)
    return batch_bound(limit, ways, tile_shape, CUDA_PIXELS, per_tile, memory_budget(free))
