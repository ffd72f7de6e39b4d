"""Windows: the tile/stride pairs an image is cut by, the automatic tile, and the merge across windows.

A window is one way to cut an LR image into tiles: ``"TILE/STRIDE"``, ``"0"`` (the whole image) or
``"auto"``. ``infer.windows`` runs several on every image (the multi-window self-ensemble of top
contest entries: the same network seen through several tile sizes errs differently at tile
borders and window-attention boundaries). Each window's SR, already merged over the ``infer.tta``
ways and the models, is merged across windows by ``infer.merge``: ``mean`` with the optional
``infer.window_weights`` (normalised), or the per-pixel ``median``. The windows of an image run one
after another: memory holds one window's work plus the running sum (the median keeps every
window's SR image). One window returns its SR untouched, so ``infer.windows=[128/64]`` is
``infer.tile=128 infer.stride=64`` bit for bit.

``auto`` (``infer.tile=auto`` or a window) resolves per padded image size, by memory: a probe
tile runs through the ensemble and its measured peak (``memory.probe_tile_memory``: the CUDA
allocator's, or the CPU process's resident peak), taken as proportional to pixels, prices the
whole image with the ensemble's ways in calls of ``memory.images_per_call``; the whole image when
that fits ``memory.memory_budget`` (a share of free VRAM, or of available RAM), else the largest
square tile that fits, a multiple of every model's window / size unit (``archs.Padded``: what the
model takes without padding inside) and of ``TILE_ALIGN``, with stride tile/2. ``AutoCut.why``
says which and why (infer prints it).

``WindowPlan`` is what ``predict.iter_predict`` asks per image: the (tile, stride) of each window,
auto resolved once per image size, and the tile batch of each geometry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.errors import UserError
from pipeline.inference.ensemble import median
from pipeline.inference.memory import Probe, images_per_call, memory_budget, probe_tile_memory
from pipeline.inference.tiling import Forward, auto_batch, effective_tile, tile_grid
from pipeline.models.archs import Padded

AUTO = "auto"
Cut = tuple[int, int]  # a resolved window: (tile, stride) in LR pixels, (0, 0) = the whole image
TILE_ALIGN = 8  # auto tiles are multiples of 8 at least: tile/2 strides stay whole, cuDNN's preferred shapes
# The probe tile's side (at most the image's): on CUDA infer.tile's default, what auto_batch probes; on the
# CPU 64, whose 8 ways are one call of CPU_PIXELS (~1 s for CRAFT) and big enough to dwarf fixed buffers.
PROBE_SIDE = {"cuda": 128, "cpu": 64}


@dataclass(frozen=True)
class Window:
    """One way to cut an image: ``tile`` LR pixels (0 = whole image, ``"auto"`` = resolved per image size)."""

    spec: str  # as written: "64/32", "0", "auto"
    tile: int | str
    stride: int  # 0 for the whole image and for auto (tile/2 once resolved)

    @property
    def whole(self) -> bool:
        return self.tile == 0


def parse_window(spec: str, setting: str) -> Window:
    """``"128/64"``, ``"0"`` (whole image) or ``"auto"``; anything else is a one-line error naming ``setting``."""
    text = str(spec).strip()
    if text == AUTO:
        return Window(AUTO, AUTO, 0)
    try:
        parts = [int(p) for p in text.split("/")]
    except ValueError:
        parts = []
    if parts == [0]:
        return Window("0", 0, 0)
    if len(parts) != 2 or not 0 < parts[1] <= parts[0]:
        raise UserError(f"{setting}: {spec!r} must be 'TILE/STRIDE' with 0 < STRIDE <= TILE, '0' (whole image) "
                        f"or '{AUTO}'")
    return Window(f"{parts[0]}/{parts[1]}", parts[0], parts[1])


def single_window(tile: int | str, stride: int) -> Window:
    """The one window of ``infer.tile`` / ``infer.stride``."""
    if tile == AUTO:
        return Window(AUTO, AUTO, 0)
    return Window("0", 0, 0) if tile == 0 else Window(f"{tile}/{stride}", tile, stride)


def window_set(tile: int | str, stride: int, windows: Sequence[str], setting: str = "infer.windows") -> list[Window]:
    """The windows an image runs through: ``windows`` when given, else the one of ``tile`` / ``stride``."""
    if not windows:
        return [single_window(tile, stride)]
    return [parse_window(w, setting) for w in windows]


def check_weights(weights: Sequence[float], windows: Sequence[str], merge: str) -> None:
    """``infer.window_weights`` against ``infer.windows`` and ``infer.merge``, as one-line errors."""
    if not weights:
        return
    if not windows:
        raise UserError("infer.window_weights needs infer.windows (one weight per window)")
    if len(weights) != len(windows):
        raise UserError(f"infer.window_weights has {len(weights)} weight(s) for {len(windows)} infer.windows")
    if merge != "mean":
        raise UserError(f"infer.window_weights need infer.merge=mean: a per-pixel {merge} takes no weights")
    if min(weights) < 0 or not sum(weights) > 0:
        raise UserError(f"infer.window_weights must be >= 0 with a positive sum, got {list(weights)}")


def model_unit(models: Sequence[nn.Module]) -> tuple[int, int]:
    """(unit, minimum): every model runs a tile whose side is a multiple of ``unit`` (and at least
    ``minimum``) without padding it inside: the lcm of their windows, size multiples and ``TILE_ALIGN``."""
    unit, minimum = TILE_ALIGN, 0
    for model in models:
        for m in model.modules():
            if isinstance(m, Padded):
                unit = math.lcm(unit, m.window, m.multiple_of)
                minimum = max(minimum, m.minimum)
    return unit, minimum


def _at_least(side: int, unit: int, minimum: int) -> int:
    """``side`` rounded down to a multiple of ``unit``, but at least the smallest multiple >= ``minimum``."""
    return max(side // unit * unit, -(-max(minimum, 1) // unit) * unit)


@dataclass(frozen=True)
class AutoCut:
    """What ``auto`` chose for one padded image size: (tile, stride), (0, 0) = the whole image, and why."""

    tile: int
    stride: int
    why: str

    @property
    def cut(self) -> Cut:
        return self.tile, self.stride


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def auto_tile(fn: Forward, padded: tuple[int, int], ways: int, device: torch.device, unit: int, minimum: int = 0,
              probe: Probe | None = None) -> AutoCut:
    """``auto`` on a padded ``padded`` (h, w) image through ``fn`` (a ``ways``-fold ensemble, calls of
    ``images_per_call``): the whole image when its calls fit the memory budget, else the largest tile that
    does (module docstring), never larger than the image's shorter side allows."""
    hp, wp = padded
    side = _at_least(min(hp, wp, PROBE_SIDE["cuda" if device.type == "cuda" else "cpu"]), unit, minimum)
    peak, free = (probe or probe_tile_memory)(fn, 3, (side, side), device)
    per_pixel = peak / (min(ways, images_per_call(side * side, device)) * side * side)  # bytes per LR pixel of a call
    budget = memory_budget(free, device)
    where = f"{'VRAM free' if device.type == 'cuda' else 'RAM available'}: {_gib(free)}, budget {_gib(budget)}"

    def need(h: int, w: int) -> float:  # peak bytes of one call over an h x w input
        return per_pixel * h * w * min(ways, images_per_call(h * w, device))

    calls = f"{ways} way(s), {min(ways, images_per_call(hp * wp, device))} per call"
    whole = need(hp, wp)
    if whole <= budget:
        return AutoCut(0, 0, f"whole image: {wp}x{hp} LR x {calls} needs ~{_gib(whole)} ({where})")
    tile = _at_least(min(math.isqrt(int(budget / per_pixel)), hp, wp), unit, minimum)
    while tile > max(unit, minimum) and need(tile, tile) > budget:
        tile = _at_least(tile - unit, unit, minimum)
    return AutoCut(tile, tile // 2, f"{tile}/{tile // 2} tiles: the whole {wp}x{hp} LR image x {calls} would need "
                                    f"~{_gib(whole)}, a {tile}^2 tile ~{_gib(need(tile, tile))} ({where})")


def cut_geometry(tile: int, stride: int, pad: int, lr: torch.Tensor) -> tuple[int, tuple[int, int]]:
    """(tiles per image, tile shape) of an LR image (3,H,W) cut by ``tile`` / ``stride`` after ``pad``."""
    h, w = lr.shape[-2] + 2 * pad, lr.shape[-1] + 2 * pad
    if tile == 0:
        return 1, (h, w)
    side = effective_tile(h, w, tile, stride)[0]
    return len(tile_grid(h, w, tile, stride)), (side, side)


class WindowPlan:
    """Per image, the (tile, stride) of each window, ``auto`` resolved once per padded image size, and
    the tile batch of each geometry, sized when first met (``batch``, else ``auto_batch``) and then
    kept in ``batches`` (``run_tiles`` lowers it after an out-of-memory error)."""

    def __init__(self, windows: Sequence[Window], unit: tuple[int, int], fn: Forward, device: torch.device,
                 ways: int, pad: int, margin: int, batch: int) -> None:
        self.windows, self.unit, self.fn, self.device = list(windows), unit, fn, device
        self.ways, self.pad, self.margin, self.batch = ways, pad, margin, batch
        self.autos: dict[tuple[int, int], AutoCut] = {}
        self.batches: dict[Cut, int] = {}

    def _auto(self, padded: tuple[int, int]) -> Cut:
        if padded not in self.autos:
            chosen = auto_tile(self.fn, padded, self.ways, self.device, *self.unit)
            tile, stride = chosen.cut
            if tile and 2 * self.margin > tile - stride:
                raise UserError(f"infer.margin={self.margin} leaves pixels uncovered on the {tile}/{stride} tiles "
                                f"'{AUTO}' chose for a {padded[1]}x{padded[0]} padded image: 2 x margin must be "
                                "<= tile - stride")
            self.autos[padded] = chosen
        return self.autos[padded].cut

    def why(self, lr: torch.Tensor) -> str:
        """What ``auto`` chose for ``lr``'s size and why ('' when no window is auto or it is not resolved)."""
        chosen = self.autos.get((lr.shape[-2] + 2 * self.pad, lr.shape[-1] + 2 * self.pad))
        return chosen.why if chosen else ""

    def __call__(self, lr: torch.Tensor) -> list[Cut]:
        """The (tile, stride) of every window on ``lr`` (3,H,W), in window order."""
        cuts = []
        for w in self.windows:
            if w.tile == AUTO:
                cut = self._auto((lr.shape[-2] + 2 * self.pad, lr.shape[-1] + 2 * self.pad))
            else:
                cut = (int(w.tile), w.stride)
            if cut not in self.batches:
                tiles, shape = cut_geometry(*cut, self.pad, lr)
                self.batches[cut] = self.batch or (
                    1 if cut[0] == 0 else auto_batch(self.fn, 3, shape, self.device, tiles, self.ways))
            cuts.append(cut)
        return cuts


def normalised(weights: Sequence[float]) -> list[float]:
    """``weights`` divided by their sum in float64 (Python floats), before any reaches a float32 image:
    [1e-45, 1e-45] is [0.5, 0.5] (in float32 1e-45 x a pixel underflows), [3e38, 3e38] too (their
    float32 sum overflows)."""
    total = math.fsum(float(w) for w in weights)
    if not (total > 0 and math.isfinite(total)):
        raise UserError(f"window weights {list(weights)[:6]} must be finite and >= 0 with a positive sum")
    return [float(w) / total for w in weights]


def merge_windows(outputs: Iterable[torch.Tensor], weights: Sequence[float], merge: str) -> torch.Tensor:
    """Merge the windows' SR images (fp32, same shape), consumed one at a time: the weighted mean
    (sum of w x SR with w normalised first; the first output as it is when there is one) or the median."""
    if merge == "median":
        kept = list(outputs)  # K x (3,sH,sW): a median needs every window's SR at once
        return kept[0] if len(kept) == 1 else median(kept)
    shares = normalised(weights)
    total: torch.Tensor | None = None
    for sr, share in zip(outputs, shares, strict=True):
        if total is None:
            total = sr if len(shares) == 1 else sr * share
        else:
            total += sr * share  # (3,sH,sW): the running sum, the only image kept between windows
    if total is None:
        raise ValueError("merge_windows needs at least one window")
    return total
