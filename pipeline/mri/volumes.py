"""Volumes in, volumes out: NIfTI (``.nii``, ``.nii.gz``) and NumPy ``.npy``, one reader, one writer.

Reading rules (docs/volumes.md):
- A volume is 3-D. Trailing axes of length 1 beyond the third are dropped ((128,128,10,1) is 3-D).
- 4-D scans (time series, diffusion directions): the fourth axis indexes volumes; ``index`` picks
  one (0 by default; ``splits`` lists one item per volume when ``mri.volume4d=all``).
- NIfTI scaling (scl_slope / scl_inter) is applied, so ``Volume.data`` holds the scanner's
  real-world values as float32; the stored dtype and scaling are kept to write outputs back.
  (float32 holds every int16 / uint16 value exactly; float64 inputs are read at float32 precision.)
- Every problem is a ``VolumeError`` naming the file: missing, empty, not a NIfTI / NumPy
  volume, wrong number of dimensions, complex or boolean values, NaN / Inf voxels, or more than
  ``max_voxels`` voxels (checked from the header before the data is read).

Writing (``write_volume``) converts back to the input's stored dtype (integers rounded and
clipped to the dtype's range) with its scaling; NIfTI keeps the input's header and affine (or a
new affine, for an output on another grid). Files are written atomically.

Normalisation (``IntensityStats``): per volume, the ``(0.5, 99.5)`` percentiles map to 0 and 1,
without clipping. Why not z-score: SR losses, PSNR and the models' residual outputs behave best
on a bounded, comparable range, and a z-score of a head scan depends on how much empty
background the field of view holds; the brightest 0.5% of voxels (vessels, fat, artefacts) would
set a max-normalisation. Nothing is clipped, so ``denormalise(normalise(x)) == x`` up to float
rounding, which the integer write removes (exact for integers below 2^22 in magnitude).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from pipeline.core.config import MriConfig
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npy")
_MRI = MriConfig()  # the defaults live in the config schema, one place
NIFTI_GZIP_LEVEL = 1  # nibabel's own default: fast, most of the size gain on MRI
# What numpy, nibabel, gzip and zlib raise for a file that is not what its suffix says.
_READ_ERRORS = (ValueError, OSError, EOFError, zlib.error, ImageFileError, HeaderDataError)


class VolumeError(UserError):
    """A volume file that is missing, unreadable or not a usable 3-D volume; the message names it."""


@dataclass(frozen=True)
class Volume:
    """One 3-D volume and what is needed to write a result back like it."""

    data: np.ndarray  # (X,Y,Z) float32 in the file's real-world units (NIfTI scaling applied)
    affine: np.ndarray  # (4,4) voxel index -> world (mm); identity for .npy
    dtype: np.dtype  # the stored dtype; outputs are written back in it
    path: Path
    header: nib.Nifti1Header | None = None  # None for .npy (Nifti2Header is a subclass)
    slope: float = 1.0  # stored value * slope + inter = real-world value
    inter: float = 0.0
    index: int = 0  # position along a 4-D scan's fourth axis


def volume_stem(path: str | Path) -> str:
    """The file name without its volume suffix (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``)."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    raise VolumeError(f"{path}: not a volume file (expected {', '.join(VOLUME_SUFFIXES)})")


def _suffix(path: Path) -> str:
    volume_stem(path)  # raises for other suffixes
    return next(s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s))


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[tuple[int, ...], int]:
    """(3-D shape, number of volumes along the fourth axis) after dropping trailing 1-length axes."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise VolumeError(f"{path}: array is {len(shape)}-D {shape}; expected a 3-D volume (or a 4-D scan)")
    if len(shape) > 4:
        raise VolumeError(f"{path}: array is {len(shape)}-D {shape}; expected a 3-D volume (or a 4-D scan)")
    if min(shape) == 0:
        raise VolumeError(f"{path}: volume is empty (shape {shape})")
    return shape[:3], (shape[3] if len(shape) == 4 else 1)


def _check_dtype(dtype: np.dtype, path: Path) -> None:
    if dtype.kind not in "iuf":
        raise VolumeError(f"{path}: voxel type {dtype} is not supported (expected integers or floats)")


def volume_shape(path: str | Path) -> tuple[tuple[int, ...], int]:
    """(3-D shape, number of volumes) from the header alone, without reading the voxels."""
    path = Path(path)
    arr, _ = _open(path)
    return _spatial_shape(arr.shape, path)


def _open(path: Path) -> tuple[object, nib.Nifti1Image | None]:
    """(lazy array with .shape / .dtype / slicing, the NIfTI image or None); errors name the file."""
    suffix = _suffix(path)
    if not path.is_file():
        raise VolumeError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise VolumeError(f"{path}: file is empty")
    try:
        if suffix == ".npy":
            with open(path, "rb") as fh:
                if fh.read(6) != b"\x93NUMPY":  # else numpy reports a refused pickle, which misleads
                    raise ValueError("no .npy header")
            # mmap: the shape and dtype come from the header; voxels are read only when sliced.
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        img = nib.load(path)
    except _READ_ERRORS as exc:
        kind = "NumPy .npy array" if suffix == ".npy" else "NIfTI image"
        raise VolumeError(f"{path}: not a readable {kind} ({str(exc).splitlines()[0]})") from None
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise VolumeError(f"{path}: {type(img).__name__} is not a NIfTI-1/2 image")
    return img.dataobj, img


def read_volume(path: str | Path, index: int = 0, max_voxels: int = _MRI.max_voxels) -> Volume:
    """Read one 3-D volume (``index`` along a 4-D scan's fourth axis) as float32 real-world values."""
    path = Path(path)
    arr, img = _open(path)
    shape, count = _spatial_shape(arr.shape, path)
    dtype = np.dtype(arr.dtype) if img is None else img.get_data_dtype()
    _check_dtype(dtype, path)
    voxels = int(np.prod(shape))
    if voxels > max_voxels:
        raise VolumeError(f"{path}: {'x'.join(map(str, shape))} = {voxels} voxels exceeds the cap of {max_voxels} "
                          "(mri.max_voxels)")
    if not 0 <= index < count:
        raise VolumeError(f"{path}: volume index {index} is outside the scan's {count} volume(s)")
    full = tuple(arr.shape)
    # Index the fourth axis (if any) and every trailing 1-length axis: reads one volume only.
    where = (slice(None),) * 3 + ((index,) if len(full) > 3 else ()) + (0,) * max(0, len(full) - 4)
    try:
        data = np.asarray(arr[where], dtype=np.float64)
    except _READ_ERRORS as exc:
        raise VolumeError(f"{path}: cannot read the voxels ({str(exc).splitlines()[0]})") from None
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise VolumeError(f"{path}: {bad} voxel(s) are NaN or infinite")
    if img is None:
        return Volume(data.astype(np.float32), np.eye(4), dtype, path, index=index)
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    return Volume(data.astype(np.float32), np.asarray(img.affine, dtype=np.float64), dtype, path,
                  img.header.copy(), slope, inter, index)


def to_stored(data: np.ndarray, dtype: np.dtype, slope: float = 1.0, inter: float = 0.0) -> np.ndarray:
    """Real-world values -> stored values of ``dtype``: unscaled, rounded and clipped for integers."""
    raw = (np.asarray(data, dtype=np.float64) - inter) / slope
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(raw), info.min, info.max).astype(dtype)
    return raw.astype(dtype)


def write_volume(path: str | Path, data: np.ndarray, like: Volume, affine: np.ndarray | None = None) -> Path:
    """Write (X,Y,Z) real-world ``data`` in ``like``'s dtype and scaling (and NIfTI header), atomically.

    The format follows ``path``'s suffix. ``affine`` replaces ``like.affine`` for an output on
    another voxel grid (NIfTI: the header's zooms follow it).
    """
    path = Path(path)
    suffix = _suffix(path)
    data = np.asarray(data)
    if data.ndim != 3:
        raise VolumeError(f"{path}: refusing to write a {data.ndim}-D array {data.shape}; volumes are 3-D")
    if not np.isfinite(data).all():
        raise VolumeError(f"{path}: refusing to write {int(np.count_nonzero(~np.isfinite(data)))} NaN/Inf voxel(s)")
    raw = to_stored(data, like.dtype, like.slope, like.inter)
    with atomic_write(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as fh:  # a file object: np.save would append .npy to the temp name
                np.save(fh, raw.astype(raw.dtype.newbyteorder("=")), allow_pickle=False)
        else:
            tmp.write_bytes(_nifti_bytes(raw, like, like.affine if affine is None else affine, suffix == ".nii.gz"))
    return path


def _nifti_bytes(raw: np.ndarray, like: Volume, affine: np.ndarray, compress: bool) -> bytes:
    """The bytes of a single-file NIfTI holding ``raw`` with ``like``'s header, dtype and scaling."""
    header = like.header.copy() if like.header is not None else None
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        img = klass(raw, affine, header)  # the header's dims and zooms are updated from raw and affine
        img.set_data_dtype(like.dtype)
    except HeaderDataError:
        raise VolumeError(f"{like.path}: its voxel type {like.dtype} cannot be stored in NIfTI; write .npy") from None
    # Explicit scaling: nibabel then writes raw as it is instead of choosing its own slope.
    img.header.set_slope_inter(like.slope, like.inter)
    data = img.to_bytes()
    # mtime=0: the same volume always gives the same file bytes.
    return gzip.compress(data, compresslevel=NIFTI_GZIP_LEVEL, mtime=0) if compress else data


@dataclass(frozen=True)
class IntensityStats:
    """Per-volume intensity mapping: ``low`` -> 0, ``high`` -> 1 (recorded to write outputs back)."""

    low: float
    high: float

    def normalise(self, data: np.ndarray) -> np.ndarray:
        return ((np.asarray(data, dtype=np.float64) - self.low) / (self.high - self.low)).astype(np.float32)

    def denormalise(self, data: np.ndarray) -> np.ndarray:
        """Back to real-world units, in float64 (so integer rounding afterwards is exact)."""
        return np.asarray(data, dtype=np.float64) * (self.high - self.low) + self.low

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}


def intensity_stats(data: np.ndarray, percentiles: tuple[float, ...] = _MRI.norm_percentiles,
                    path: str | Path = "<volume>") -> IntensityStats:
    """The percentiles of all voxels; min / max when they coincide (a mostly empty volume)."""
    if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise UserError(f"mri.norm_percentiles={tuple(percentiles)} must be two increasing values in 0..100")
    low, high = (float(v) for v in np.percentile(data, percentiles))
    if high <= low:
        low, high = float(np.min(data)), float(np.max(data))
    if high <= low:
        raise VolumeError(f"{path}: every voxel is {low:g}; a constant volume cannot be normalised")
    return IntensityStats(low, high)


def list_volumes(folder: str | Path) -> list[Path]:
    """Volume files directly inside ``folder``, sorted by name; none, or two sharing a stem, is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(f"{folder}: folder not found")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES) and not p.name.startswith("."))
    seen: dict[str, Path] = {}
    for p in files:
        stem = volume_stem(p)
        if stem in seen:
            raise VolumeError(f"{folder}: two volumes share the name {stem!r}: {seen[stem].name}, {p.name}")
        seen[stem] = p
    if not files:
        raise VolumeError(f"{folder}: no volumes found ({', '.join(VOLUME_SUFFIXES)})")
    return files
