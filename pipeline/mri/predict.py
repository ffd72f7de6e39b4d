"""Volume inference: an LR ``Volume`` and a volume model (or an interpolation baseline) -> an SR volume.

``super_resolve(model, spec, volume, settings)``:
1. intensities normalised with the LR volume's own ``IntensityStats`` (training normalises each
   LR/HR pair with its LR's statistics: the only ones known at inference);
2. thick slices (``upsample`` > 1 on an axis) brought to the HR grid by ``settings.interp`` first,
   for same-grid models (mDCSRN refines an interpolated volume);
3. the model on the whole volume (``tile=0``) or on overlapping 3-D tiles (``tiling.run_tiles``, one
   tile side per axis so a thin axis is taken whole); a slice model (``dims=2``, SRResCycGAN) runs
   slice by slice along ``settings.slice_axis`` inside each tile and upscales the other two axes;
4. denormalised to the input's real-world units, with the affine of the output grid
   (``degrade.finer_affine``: upsample x model scale per axis over the same field of view).
``write_sr`` writes it back in the input's dtype and scaling (NIfTI header kept). ``interpolate`` is
the same for the trilinear / tricubic baselines. fp32 throughout (no autocast for volumes yet).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core.config import MriConfig, MriInferConfig, SectionView, view_of
from pipeline.core.errors import UserError
from pipeline.core.runtime import pick_device
from pipeline.inference.tiling import Forward, TileError, auto_batch, run_tiles, tile_corners, tile_geometry
from pipeline.mri.degrade import INTERPOLATIONS, finer_affine, to_grid
from pipeline.mri.metrics import BASELINES
from pipeline.mri.models import VOLUME_MODELS, VolumeModelSpec
from pipeline.mri.volumes import Volume, intensity_stats, write_volume

_MRI = MriConfig()  # the defaults live in the config schema, one place


@view_of(MriInferConfig)
class VolumeSettings(SectionView):
    """How a volume goes through a model (see ``MriInferConfig`` for each field and its default)."""

    tile: int
    stride: int
    margin: int
    pad: int
    tile_blend: str
    batch: int
    interp: str
    slice_axis: int


@dataclass(frozen=True)
class SRVolume:
    """A super-resolved volume in the input's real-world units, and its grid."""

    data: np.ndarray  # (X,Y,Z) float64
    affine: np.ndarray  # (4,4) of the output grid
    seconds: float = 0.0
    tiles: int = 0


def grid_factors(mri: MriConfig) -> tuple[int, int, int]:
    """How many HR voxels one LR voxel spans per axis under ``mri.degradation`` (k-space: the same grid)."""
    factors = [1, 1, 1]
    if mri.degradation == "thick":
        factors[mri.thick_axis] = mri.thick_factor
    return (factors[0], factors[1], factors[2])


def volume_scale(spec: VolumeModelSpec, slice_axis: int) -> tuple[int, int, int]:
    """The model's output / input size per volume axis (a slice model keeps ``slice_axis``)."""
    if spec.role == "critic" or spec.scale is None:
        raise UserError(f"a {spec.role} cannot super-resolve volumes; choose a generator from pipeline/mri/models.py")
    if spec.dims == 3:
        return (spec.scale[0], spec.scale[1], spec.scale[2])
    in_plane = iter(spec.scale)
    return tuple(1 if axis == slice_axis else next(in_plane) for axis in range(3))  # type: ignore[return-value]


def slice_forward(model: nn.Module, slice_axis: int) -> Forward:
    """A 2-D model applied to every slice of a tile batch along ``slice_axis`` (0..2 of the volume axes)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        v = x.movedim(2 + slice_axis, 2)  # (N,C,a,b,c) -> (N,C,S,h,w): the slice axis first
        s, h, w = v.shape[2:]
        flat = v.transpose(1, 2).reshape(n * s, c, h, w)  # (N,C,S,h,w) -> (N*S,C,h,w)
        out = model(flat)  # (N*S,C,h,w) -> (N*S,C,sh,sw)
        # (N*S,C,sh,sw) -> (N,S,C,sh,sw) -> (N,C,S,sh,sw) -> the slice axis back in place
        return out.reshape(n, s, c, *out.shape[2:]).transpose(1, 2).movedim(2, 2 + slice_axis)
    return run


def _forward(model: nn.Module, spec: VolumeModelSpec, settings: VolumeSettings) -> Forward:
    return model if spec.dims == 3 else slice_forward(model, settings.slice_axis)


def _check(settings: VolumeSettings) -> None:
    s = settings
    if s.tile and not 0 < s.stride <= s.tile:
        raise UserError(f"mri_infer.stride={s.stride} must be in 1..mri_infer.tile ({s.tile}); a larger stride "
                        "leaves gaps")
    if s.tile and 2 * s.margin > s.tile - s.stride:
        raise UserError(f"mri_infer.margin={s.margin} leaves voxels uncovered: 2 x margin must be <= tile - stride "
                        f"({s.tile} - {s.stride})")
    if s.interp not in INTERPOLATIONS:
        raise UserError(f"mri_infer.interp={s.interp}: choose from {', '.join(INTERPOLATIONS)}")


def super_resolve(model: nn.Module, spec: VolumeModelSpec, volume: Volume, settings: VolumeSettings | None = None,
                  upsample: tuple[int, int, int] = (1, 1, 1), device: torch.device | None = None,
                  percentiles: tuple[float, ...] = _MRI.norm_percentiles) -> SRVolume:
    """The SR of ``volume`` by ``model`` (module docstring); ``upsample``: LR -> HR grid factors (``grid_factors``)."""
    settings = settings or VolumeSettings()
    _check(settings)
    device = device or pick_device()
    start = time.perf_counter()
    stats = intensity_stats(volume.data, percentiles, volume.path)
    x = stats.normalise(volume.data)
    if upsample != (1, 1, 1):  # thick slices onto the HR grid; the model then refines on that grid
        x = to_grid(x, [n * f for n, f in zip(x.shape, upsample)], INTERPOLATIONS[settings.interp])
    scale = volume_scale(spec, settings.slice_axis)
    lr = torch.from_numpy(np.ascontiguousarray(x))[None, None].to(device)  # (X,Y,Z) -> (1,1,X,Y,Z)
    fn = _forward(model.eval().to(device), spec, settings)
    tile = (settings.tile,) * 3  # per axis: an axis shorter than the tile is taken whole, the others keep it
    padded = tuple(n + 2 * settings.pad for n in x.shape)
    batch = settings.batch
    if batch == 0:
        shape = tile_geometry(padded, tile, settings.stride)[0] if settings.tile else padded
        count = len(tile_corners(padded, tile, settings.stride)) if settings.tile else 1
        batch = auto_batch(fn, 1, shape, device, count)
    try:
        with torch.inference_mode():
            out, report = run_tiles(fn, lr, tile if settings.tile else 0, settings.stride, settings.tile_blend, batch,
                                    settings.pad, settings.margin)
    except UserError as exc:
        raise type(exc)(f"{volume.path}: {exc}") from exc
    except TileError as exc:
        raise TileError(f"{volume.path}: {exc}") from exc
    sr = out[0, 0].cpu().numpy()  # (1,1,X',Y',Z') -> (X',Y',Z'): the volume's one copy to the host
    if not np.isfinite(sr).all():
        raise UserError(f"{volume.path}: the model produced NaN/Inf (broken weights?)")
    factors = tuple(u * s for u, s in zip(upsample, scale))
    expected = tuple(n * f for n, f in zip(volume.data.shape, factors))
    if sr.shape != expected:
        raise UserError(f"{volume.path}: the model gave {sr.shape}, expected {expected} (scale {scale} in the table)")
    return SRVolume(stats.denormalise(sr), finer_affine(volume.affine, factors), time.perf_counter() - start,
                    report.tiles)


def interpolate(volume: Volume, upsample: tuple[int, int, int], baseline: str) -> SRVolume:
    """The trilinear / tricubic (/ nearest) baseline: ``volume`` interpolated onto the HR grid."""
    if baseline not in BASELINES:
        raise UserError(f"unknown baseline {baseline!r}; choose from {', '.join(BASELINES)}")
    start = time.perf_counter()
    shape = [n * f for n, f in zip(volume.data.shape, upsample)]
    data = to_grid(volume.data, shape, INTERPOLATIONS[BASELINES[baseline]]).astype(np.float64)
    return SRVolume(data, finer_affine(volume.affine, upsample), time.perf_counter() - start, 0)


def write_sr(path: str | Path, sr: SRVolume, like: Volume) -> Path:
    """Write ``sr`` in ``like``'s stored dtype and scaling (and NIfTI header), with the SR grid's affine."""
    return write_volume(path, sr.data, like, sr.affine)


def spec_of(name: str) -> VolumeModelSpec:
    """The table entry of a volume model name."""
    if name not in VOLUME_MODELS:
        raise UserError(f"unknown volume model {name!r}; known: {', '.join(sorted(VOLUME_MODELS))}")
    return VOLUME_MODELS[name]
