"""Tiled inference on images and volumes: pad, cut overlapping tiles, run them in batches, merge with weights, crop.

One tiler for 2 or 3 spatial axes: an image (1,C,H,W) or (C,H,W), a volume (1,C,D,H,W).
``tile_forward`` is a pure function of its arguments: no state survives between calls, and a
failed batch never leaves partial results behind (tiles are added to the output only after
their whole batch succeeded). The pieces:

- Sizes (``tile``, ``stride``, ``margin``, ``pad``) are one int for every spatial axis or a tuple
  with one value per axis ((D,H,W) order for volumes), in LR pixels / voxels.
- ``pad`` LR pixels of reflection on both sides of each axis (0 = none), applied identically with
  and without tiles, so edge pixels can see context like interior ones and ``tile=0`` computes the
  same function as any tiling.
- The grid (``tile_grid``, ``tile_corners``): tiles every ``stride`` pixels, the last one flush with
  the far edge, so any size is covered without extra padding. A 512 image with tile 128 / stride
  64 gives 7 x 7 = 49 tiles, the reference team's setting. ``tile=0`` is the whole input; a 0
  inside a per-axis tuple is the whole of that axis.
- A tile larger than the input shrinks (``tile_geometry``): an int tile stays square / cubic and
  shrinks to the shortest axis (every dihedral transform of a tile batch keeps its shape); a
  per-axis tuple shrinks each axis to its own length (a 10-slice volume keeps 32 x 32 in-plane).
- Weights: ``mean`` (every covering tile counts equally, the reference) or ``hann`` (a separable
  sin^2 window per axis with a floor of ``HANN_FLOOR``, multiplied over the axes, so no pixel
  ever ends with zero weight). ``margin`` LR pixels along tile sides that face another tile get
  weight 0: with a margin at least the model's receptive radius (and 2 * margin <= tile - stride
  per axis, which keeps every pixel covered) the tiled output equals the whole-input output to
  float precision.
- The scale per axis is read from the model's first output (1 for a same-grid model, (1, 1, 4)
  for one that upsamples the last axis only); every later batch must match it.
- Batches: ``batch`` tiles per call (0 = ``CPU_BATCH``; ``auto_batch`` sizes it to the device: LR
  pixels per forward, and on CUDA also a memory cap from a one-tile probe). Out of memory halves
  the batch and retries the same tiles; a single tile that does not fit stops with
  ``TileMemoryError``. ``fixed_batch`` pads the last, shorter batch up to the batch size (the
  padding rows are dropped after the forward), so a compiled model only ever sees one shape.
- Everything stays on the input's device: tiles are cut there, the weight maps of a geometry are
  built once (``merge_plan``, cached) and the whole output is accumulated in fp32 there; the
  caller copies the finished result to the host once.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.inference.memory import (
    CPU_PIXELS,
    CUDA_PIXELS,
    Probe,
    TileMemoryError,
    is_oom,
    memory_budget,
    probe_tile_memory,
)

Forward = Callable[[torch.Tensor], torch.Tensor]  # (N,C,*s) -> (N,C,*(scale*s)), 2 or 3 spatial axes
Size = int | tuple[int, ...]  # one value for every spatial axis, or one per axis

BLENDS = ("mean", "hann")
HANN_FLOOR = 0.02  # weight at a tile's outermost pixel, relative to its centre
CPU_BATCH = 4  # tiles per call when the caller gives no batch and no auto_batch


class TileError(RuntimeError):
    """A tile's forward pass failed; the message says which tile of which input size."""


@dataclass(frozen=True)
class TileReport:
    """What a ``run_tiles`` call did: tiles run, the batch that worked, the tile shape."""

    tiles: int
    batch: int
    tile_shape: tuple[int, ...]


AXES = {2: ("y", "x"), 3: ("z", "y", "x")}  # names of the spatial axes in messages
KIND = {2: "image", 3: "volume"}
TILE_SETTING = {2: "infer.tile", 3: "mri_infer.tile"}  # what a user lowers when a tile does not fit


def per_axis(value: Size, dims: int, name: str = "size") -> tuple[int, ...]:
    """``value`` as one int per spatial axis; a tuple of another length is an error."""
    if isinstance(value, int):
        return (value,) * dims
    out = tuple(int(v) for v in value)
    if len(out) != dims:
        raise ValueError(f"{name} {tuple(value)} has {len(out)} value(s) for {dims} spatial axes")
    return out


def _axis_starts(n: int, tile: int, stride: int) -> list[int]:
    if tile >= n:
        return [0]
    starts = list(range(0, n - tile + 1, stride))
    if starts[-1] != n - tile:
        starts.append(n - tile)  # flush with the far edge: covered without padding
    return starts


def _shrink(n: int, tile: int, stride: int) -> tuple[int, int]:
    """(tile, stride) on an axis of ``n``: a shrunk tile keeps its overlap, up to half of itself."""
    if not 0 < stride <= tile:
        raise ValueError(f"stride must be in 1..tile ({tile}), got {stride}: a larger stride leaves gaps")
    side = min(tile, n)
    return (tile, stride) if side == tile else (side, side - min(tile - stride, side // 2))


def tile_geometry(shape: tuple[int, ...], tile: Size, stride: Size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tile, stride) per axis used on an input of spatial ``shape`` (module docstring: shrinking rules).

    ``tile=0`` (or 0 on an axis) is the whole input (axis): its stride is its length.
    """
    dims = len(shape)
    strides = per_axis(stride, dims, "stride")
    if isinstance(tile, int):
        if tile < 0:
            raise ValueError(f"tile must be >= 0, got {tile}")
        if tile == 0:
            return tuple(shape), tuple(shape)
        # Isotropic: every axis takes the side the shortest axis allows.
        pairs = [_shrink(min(shape), tile, s) for s in strides]
    else:
        tiles = per_axis(tile, dims, "tile")
        if min(tiles) < 0:
            raise ValueError(f"tile must be >= 0 on every axis, got {tiles}")
        pairs = [(n, n) if t == 0 else _shrink(n, t, s) for n, t, s in zip(shape, tiles, strides)]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def effective_tile(height: int, width: int, tile: int, stride: int) -> tuple[int, int]:
    """The square tile side and stride used on a height x width image.

    A tile larger than the image shrinks to the shorter side (tiles stay square, so every
    dihedral transform of a tile batch keeps its shape); the stride shrinks with it so the
    overlap ``tile - stride`` is kept, up to half the shrunk tile.
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive here, got {tile}")
    sides, steps = tile_geometry((height, width), tile, stride)
    return sides[0], steps[0]


def tile_corners(shape: tuple[int, ...], tile: Size, stride: Size) -> list[tuple[int, ...]]:
    """First corners of the tiles covering an input of spatial ``shape``, in row-major order."""
    sides, steps = tile_geometry(shape, tile, stride)
    return list(itertools.product(*(_axis_starts(n, t, s) for n, t, s in zip(shape, sides, steps))))


def tile_grid(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the tiles covering a height x width image, row by row.

    ``tile=0`` is the whole image: one tile at (0, 0).
    """
    return tile_corners((height, width), tile, stride)  # type: ignore[return-value]


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


def _reflect_pad(x: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
    """(1,C,*S) -> (1,C,*(S+2p)); reflection needs p < side on every axis, else the edge is repeated."""
    if not any(pad):
        return x
    mode = "reflect" if all(p < n for p, n in zip(pad, x.shape[2:])) else "replicate"
    return F.pad(x, [p for p in reversed(pad) for _ in (0, 1)], mode=mode)  # F.pad lists the last axis first


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class MergePlan:
    """The merge weights of one geometry: a few distinct tile maps, which tile uses which, their sum."""

    maps: torch.Tensor  # (K,1,*tile*s): the distinct weight maps (K <= 3^axes: edge/interior per side)
    index: torch.Tensor  # (n,) long, on the maps' device: the map of each tile, in grid order
    wsum: torch.Tensor  # (1,1,*padded*s): summed weights (never zero: checked when built)


def _box(corner: tuple[int, ...], size: tuple[int, ...], scale: tuple[int, ...]) -> tuple[slice, ...]:
    """The output slices of a tile: (c*s : (c+t)*s) per axis."""
    return tuple(slice(c * s, (c + t) * s) for c, t, s in zip(corner, size, scale))


@functools.lru_cache(maxsize=16)
def merge_plan(hp: int, wp: int, tile: Size, stride: Size, blend: str, margin: Size, scale: Size,
               device: torch.device, depth: int = 0) -> MergePlan:
    """Weights of every tile of a padded hp x wp image (depth x hp x wp volume), built once per geometry.

    ``depth`` is 0 for an image. ``margin`` is the already-resolved margin in LR pixels per axis
    (``run_tiles`` shrinks it for small inputs). A side is cut only where another tile lies beyond
    it, never at the input's edge.
    """
    shape = (depth, hp, wp) if depth else (hp, wp)
    dims = len(shape)
    corners = tile_corners(shape, tile, stride)
    sides = tile_geometry(shape, tile, stride)[0]
    scales, margins = per_axis(scale, dims, "scale"), per_axis(margin, dims, "margin")
    keys: dict[tuple[bool, ...], int] = {}
    maps, index = [], []
    wsum = torch.zeros(1, 1, *(n * s for n, s in zip(shape, scales)), dtype=torch.float32, device=device)
    for corner in corners:
        key = tuple(flag for c, t, n in zip(corner, sides, shape) for flag in (c > 0, c + t < n))
        if key not in keys:
            weights = [window_1d(t * s, blend, m * s * key[2 * i], m * s * key[2 * i + 1], device)
                       for i, (t, s, m) in enumerate(zip(sides, scales, margins))]
            # Outer product over the axes: (t0*s0,) x (t1*s1,) [x (t2*s2,)] -> (t0*s0, t1*s1[, t2*s2])
            keys[key] = len(maps)
            maps.append(functools.reduce(lambda acc, w: acc[..., None] * w, weights))
        index.append(keys[key])
        wsum[(0, 0, *_box(corner, sides, scales))] += maps[keys[key]]
    if bool((wsum <= 0).any()):  # cannot happen with run_tiles' checks; never return a hole
        raise TileError(f"zero-weight pixels after merging {len(corners)} tiles of {'x'.join(map(str, sides))} "
                        f"on {'x'.join(map(str, shape))}")
    stacked = torch.stack(maps)[:, None]  # K x (*tile*s) -> (K,1,*tile*s)
    return MergePlan(stacked, torch.tensor(index, dtype=torch.long, device=device), wsum)


def _resolve_margin(shape: tuple[int, ...], tile: Size, sides: tuple[int, ...], steps: tuple[int, ...],
                    margin: tuple[int, ...]) -> tuple[int, ...]:
    """The margin per axis: 0 on a whole axis, shrunk on an axis smaller than the tile, else checked."""
    asked = per_axis(tile, len(shape), "tile")
    out = []
    for want, side, step, m in zip(asked, sides, steps, margin):
        if want == 0:
            out.append(0)
        elif side < want:  # an input smaller than the tile: shrink the margin with it
            out.append(min(m, (side - step) // 2))
        elif 2 * m > side - step:
            raise ValueError(f"margin {m} leaves pixels uncovered: 2 x margin must be <= tile - stride "
                             f"({side} - {step} on a {'x'.join(map(str, shape))} padded {KIND[len(shape)]})")
        else:
            out.append(m)
    return tuple(out)


def run_tiles(fn: Forward, lr: torch.Tensor, tile: Size, stride: Size, blend: str = "mean", batch: int = 0,
              pad: Size = 0, margin: Size = 0, fixed_batch: bool = False) -> tuple[torch.Tensor, TileReport]:
    """``tile_forward`` that also reports the tile count and the batch size that fitted.

    ``fixed_batch``: pad a shorter last batch with copies of its last tile up to the batch size
    and drop their outputs, so ``fn`` is always called with one shape (for a compiled model).
    """
    squeeze = lr.dim() == 3
    x = lr.unsqueeze(0) if squeeze else lr  # (C,H,W) -> (1,C,H,W)
    if x.dim() not in (4, 5) or x.shape[0] != 1:
        raise ValueError(f"lr must be (C,H,W), (1,C,H,W) or (1,C,D,H,W), got {tuple(lr.shape)}")
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r}; choose from {', '.join(BLENDS)}")
    dims = x.dim() - 2
    tile, stride = (v if isinstance(v, int) else tuple(v) for v in (tile, stride))  # hashable: merge_plan's cache key
    pads, margins = per_axis(pad, dims, "pad"), per_axis(margin, dims, "margin")
    tiles_asked = per_axis(tile, dims, "tile")
    if min(pads) < 0 or min(margins) < 0 or batch < 0 or min(tiles_asked) < 0:
        raise ValueError(f"tile, batch, pad and margin must be >= 0 (got {tile}, {batch}, {pad}, {margin})")
    size_in = tuple(x.shape[2:])
    x = _reflect_pad(x.float(), pads)  # (1,C,*S) -> (1,C,*(S+2p))
    padded = tuple(x.shape[2:])
    sides, steps = tile_geometry(padded, tile, stride)
    margins = _resolve_margin(padded, tile, sides, steps, margins)
    corners = tile_corners(padded, tile, stride)
    n = len(corners)
    size = batch or CPU_BATCH
    out: torch.Tensor | None = None
    plan: MergePlan | None = None
    scales: tuple[int, ...] = (1,) * dims
    cuts = [(slice(None), slice(None), *_box(corner, sides, (1,) * dims)) for corner in corners]  # input slices
    boxes: list[tuple[slice, ...]] = []  # output slices of every tile, once the scale is known

    def where(i: int, count: int) -> str:  # built only for a message: the loop stays as lean as the 2-D one was
        at = " ".join(f"{a}={c}" for a, c in zip(AXES[dims], corners[i]))
        return (f"tiles {i}..{i + count - 1} of {n} ({'x'.join(map(str, sides))} LR, first at {at}) of a "
                f"{'x'.join(map(str, size_in))} {KIND[dims]} padded to {'x'.join(map(str, padded))}")

    i = 0
    while i < n:
        count = min(size, n - i)
        tiles = torch.cat([x[cut] for cut in cuts[i:i + count]])  # (N,C,*tile)
        if fixed_batch and count < size:  # (N,C,*tile) -> (size,C,*tile): one shape for every call
            tiles = torch.cat([tiles, tiles[-1:].expand(size - count, *tiles.shape[1:])])
        try:
            pred = fn(tiles).float()[:count]  # padding rows, if any, dropped: (N,C,*(s*tile))
        except Exception as exc:
            if not is_oom(exc):
                raise TileError(f"{where(i, count)}: {type(exc).__name__}: {exc}") from exc
            del tiles
            _free_cache(x.device)
            if size == 1:
                raise TileMemoryError(f"out of memory on a single tile ({where(i, count)}, device {x.device}); "
                                      f"lower {TILE_SETTING[dims]} or use a smaller model") from exc
            size //= 2  # retry the same tiles: nothing from this batch was accumulated
            continue
        if out is None:  # the first batch tells the scale per axis and the channel count
            scales = tuple(max(1, p // t) for p, t in zip(pred.shape[2:], sides))
            out = torch.zeros(1, pred.shape[1], *(p * s for p, s in zip(padded, scales)),
                              dtype=torch.float32, device=pred.device)
            plan = merge_plan(*padded[-2:], tile, stride, blend, margins, scales, pred.device,
                              depth=padded[0] if dims == 3 else 0)
            boxes = [(0, slice(None), *_box(corner, sides, scales)) for corner in corners]
        assert plan is not None
        expected = (count, out.shape[1], *(t * s for t, s in zip(sides, scales)))
        if tuple(pred.shape) != expected:
            raise TileError(f"{where(i, count)}: the model returned {tuple(pred.shape)}, expected {expected}")
        weighted = pred * plan.maps[plan.index[i:i + count]]  # (N,C,*st) x (N,1,*st)
        for k in range(count):
            out[boxes[i + k]] += weighted[k]
        del pred, tiles, weighted  # free this batch before the next forward allocates its own
        i += count
    assert out is not None and plan is not None
    out = out / plan.wsum
    crop = tuple(slice(p * s, (p + m) * s) for p, m, s in zip(pads, size_in, scales))
    out = out[(slice(None), slice(None), *crop)]  # crop the padding: (1,C,*(s*S))
    return (out[0] if squeeze else out), TileReport(n, size, sides)


def tile_forward(fn: Forward, lr: torch.Tensor, tile: Size, stride: Size, blend: str = "mean", batch: int = 0,
                 pad: Size = 0, margin: Size = 0) -> torch.Tensor:
    """Super-resolve ``lr`` (C,H,W), (1,C,H,W) or (1,C,D,H,W) tile by tile; returns fp32 of the same rank.

    ``fn`` maps a tile batch (N,C,*s) to (N,C,*(scale*s)): a model, or a self-ensemble around one.
    """
    return run_tiles(fn, lr, tile, stride, blend, batch, pad, margin)[0]


def batch_bound(tiles: int, ways: int, tile_shape: tuple[int, ...], pixels: int, per_tile_bytes: int = 0,
                budget_bytes: int = 0) -> int:
    """Tiles per forward: at most ``tiles``, at most ``pixels`` LR pixels (tiles x ways x tile area or
    volume) and, when ``per_tile_bytes`` is given, at most ``budget_bytes`` of measured memory; at least 1."""
    by_pixels = pixels // (max(1, ways) * math.prod(tile_shape))
    by_memory = budget_bytes // per_tile_bytes if per_tile_bytes > 0 else by_pixels
    return max(1, min(tiles, by_pixels, by_memory))


def auto_batch(fn: Forward, channels: int, tile_shape: tuple[int, ...], device: torch.device, limit: int,
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
