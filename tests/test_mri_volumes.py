"""Volume IO, normalisation and the split by subject (pipeline.mri.volumes, pipeline.mri.splits)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.core.errors import DataError
from pipeline.mri.bundled import bundled_scans
from pipeline.mri.splits import build_splits, read_splits, splits_path, subject_of, write_splits
from pipeline.mri.volumes import (
    VolumeError,
    intensity_stats,
    read_volume,
    to_stored,
    volume_shape,
    write_volume,
)

BUNDLED = {  # file -> (3-D shape, volumes along the 4th axis, stored dtype)
    "S0_10slices.nii.gz": ((128, 128, 10), 1, np.uint16),
    "aniso_vox.nii.gz": ((58, 58, 24), 1, np.int16),
    "example4d.nii.gz": ((128, 96, 24), 2, np.int16),
    "anatomical.nii": ((33, 41, 25), 1, np.int16),
}


def bundled(name: str) -> Path:
    return next(p for p in bundled_scans() if p.name == name)


def test_every_bundled_scan_is_listed() -> None:
    assert sorted(p.name for p in bundled_scans()) == sorted(BUNDLED)


@pytest.mark.parametrize("rel", sorted(BUNDLED))
def test_bundled_scans_load(rel: str) -> None:
    shape, count, dtype = BUNDLED[rel]
    vol = read_volume(bundled(rel))
    assert vol.data.shape == shape and vol.data.dtype == np.float32
    assert volume_shape(bundled(rel)) == (shape, count)
    assert vol.dtype.newbyteorder("=") == np.dtype(dtype)
    assert np.isfinite(vol.data).all() and vol.data.max() > vol.data.min()
    assert vol.affine.shape == (4, 4) and vol.header is not None


def test_4d_scan_volumes_are_selected_by_index() -> None:
    path = bundled("example4d.nii.gz")
    first, second = read_volume(path, 0), read_volume(path, 1)
    full = np.asanyarray(nib.load(path).dataobj)
    assert np.array_equal(first.data, full[..., 0]) and np.array_equal(second.data, full[..., 1])
    with pytest.raises(VolumeError, match="index 2 is outside"):
        read_volume(path, 2)


def _affine() -> np.ndarray:
    # Rotated, anisotropic, shifted: every entry of the affine matters.
    c, s = np.cos(0.3), np.sin(0.3)
    return np.array([[1.2 * c, -0.9 * s, 0.0, -40.5], [1.2 * s, 0.9 * c, 0.0, 12.25],
                     [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]])


def _source(tmp_path: Path, dtype: type, suffix: str, slope: float = 1.0, inter: float = 0.0) -> Path:
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = rng.integers(max(info.min, -3000), min(info.max, 3000), size=(9, 8, 7), endpoint=True).astype(dtype)
    else:
        data = (rng.standard_normal((9, 8, 7)) * 100).astype(dtype)
    img = nib.Nifti1Image(data, _affine())
    img.header["descrip"] = b"sr-pipeline test"
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(_affine(), code=1)
    img.header.set_sform(_affine(), code=2)
    img.header.set_slope_inter(slope, inter)
    path = tmp_path / f"src{suffix}"
    nib.save(img, path)
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.uint16, np.float32, np.float64])
def test_nifti_round_trip_keeps_affine_header_and_dtype(tmp_path: Path, dtype: type, suffix: str) -> None:
    src = _source(tmp_path, dtype, suffix)
    vol = read_volume(src)
    out = write_volume(tmp_path / f"out{suffix}", vol.data, vol)
    a, b = nib.load(src), nib.load(out)
    assert b.get_data_dtype() == a.get_data_dtype() == np.dtype(dtype)
    assert np.allclose(b.affine, a.affine, atol=1e-6)
    for key in ("qform_code", "sform_code", "xyzt_units", "descrip", "dim", "srow_x", "srow_y", "srow_z"):
        assert np.array_equal(a.header[key], b.header[key]), key
    assert np.allclose(a.header["pixdim"], b.header["pixdim"])
    raw_a, raw_b = np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)
    if dtype == np.float64:  # read at float32 precision (documented)
        assert np.allclose(raw_b, raw_a, rtol=1e-6, atol=1e-4)
    else:
        assert np.array_equal(raw_b, raw_a)
    # Through normalisation and back: exact for integers, float32 precision for floats.
    stats = intensity_stats(vol.data)
    write_volume(out, stats.denormalise(stats.normalise(vol.data)), vol)
    raw_c = np.asanyarray(nib.load(out).dataobj)
    assert raw_c.dtype == raw_a.dtype
    if np.issubdtype(dtype, np.integer):
        assert np.array_equal(raw_c, raw_a)
    else:
        assert np.allclose(raw_c, raw_a, rtol=1e-5, atol=1e-3)


def test_scaled_integer_nifti_keeps_its_scaling(tmp_path: Path) -> None:
    src = _source(tmp_path, np.int16, ".nii.gz", slope=0.5, inter=10.0)
    vol = read_volume(src)
    assert (vol.slope, vol.inter) == (0.5, 10.0)
    out = write_volume(tmp_path / "out.nii.gz", vol.data, vol)
    a, b = nib.load(src), nib.load(out)
    assert (b.dataobj.slope, b.dataobj.inter) == (0.5, 10.0)
    assert np.array_equal(b.dataobj.get_unscaled(), a.dataobj.get_unscaled())


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_npy_round_trip(tmp_path: Path, dtype: type) -> None:
    data = (np.random.default_rng(1).standard_normal((5, 6, 7)) * 500).astype(dtype)
    np.save(tmp_path / "a.npy", data)
    vol = read_volume(tmp_path / "a.npy")
    assert vol.dtype == np.dtype(dtype) and np.array_equal(vol.affine, np.eye(4))
    write_volume(tmp_path / "b.npy", vol.data, vol)
    back = np.load(tmp_path / "b.npy")
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, data)
    # A .npy volume written as NIfTI keeps its dtype (identity affine).
    write_volume(tmp_path / "b.nii.gz", vol.data, vol)
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "b.nii.gz").dataobj), data)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.uint8])
def test_normalisation_round_trip_is_exact_for_integers(dtype: type) -> None:
    info = np.iinfo(dtype)
    low, high = max(info.min, -2**21), min(info.max, 2**21)
    data = np.random.default_rng(2).integers(low, high, size=(20, 20, 20), endpoint=True).astype(dtype)
    data[0, 0, :2] = (low, high)  # the extremes, beyond the percentiles
    vol32 = data.astype(np.float32)
    stats = intensity_stats(vol32)
    normalised = stats.normalise(vol32)
    assert normalised.dtype == np.float32
    assert np.isclose(np.percentile(normalised, 0.5), 0, atol=1e-6)
    assert np.isclose(np.percentile(normalised, 99.5), 1, atol=1e-6)
    assert np.array_equal(to_stored(stats.denormalise(normalised), np.dtype(dtype)), data)


def test_integer_writes_round_and_clip(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 2, 2), np.uint16))
    vol = read_volume(tmp_path / "a.npy")
    values = np.array([-5.6, 2.4, 2.6, 70000.2, 65534.6, 0.0, 1.0, 3.0]).reshape(2, 2, 2)
    write_volume(tmp_path / "b.npy", values, vol)
    assert np.load(tmp_path / "b.npy").ravel().tolist() == [0, 2, 3, 65535, 65535, 0, 1, 3]


def test_constant_volume_cannot_be_normalised() -> None:
    with pytest.raises(VolumeError, match="constant"):
        intensity_stats(np.full((4, 4, 4), 7.0), path="flat.nii")


def _bad(tmp_path: Path, case: str) -> tuple[Path, dict]:
    p = tmp_path / f"{case}.npy"
    arrays = {"2d": np.zeros((4, 4)), "5d": np.zeros((2, 2, 2, 2, 2)), "zero": np.zeros((4, 0, 4)),
              "complex": np.zeros((3, 3, 3), np.complex64), "bool": np.zeros((3, 3, 3), bool),
              "large": np.zeros((10, 10, 10))}
    kwargs: dict = {"max_voxels": 999} if case == "large" else {}
    if case in arrays:
        np.save(p, arrays[case])
    elif case == "nan":
        np.save(p, np.where(np.eye(3)[None] > 0, np.nan, 1.0))
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "garbage_npy":
        p.write_bytes(b"this is not an array")
    elif case == "garbage_nii":
        p = tmp_path / "scan.nii.gz"
        p.write_bytes(b"\x1f\x8b not really gzip")
    elif case == "suffix":
        p = tmp_path / "scan.png"
        p.write_bytes(b"x")
    elif case == "missing":
        p = tmp_path / "absent.nii"
    return p, kwargs


@pytest.mark.parametrize("case", ["2d", "5d", "zero", "complex", "bool", "large", "nan", "empty", "garbage_npy",
                                  "garbage_nii", "suffix", "missing"])
def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    path, kwargs = _bad(tmp_path, case)
    with pytest.raises(VolumeError) as err:
        read_volume(path, **kwargs)
    message = str(err.value)
    assert str(path) in message and "\n" not in message


def test_writes_are_atomic_and_refuse_non_finite(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 2, 2), np.float32))
    vol = read_volume(tmp_path / "a.npy")
    out = tmp_path / "out" / "b.nii.gz"
    with pytest.raises(VolumeError, match="NaN"):
        write_volume(out, np.full((2, 2, 2), np.nan), vol)
    with pytest.raises(VolumeError, match="3-D"):
        write_volume(out, np.zeros((2, 2)), vol)
    # A failure while the file is being written (float16 has no NIfTI code) leaves nothing behind.
    np.save(tmp_path / "h.npy", np.zeros((2, 2, 2), np.float16))
    with pytest.raises(VolumeError, match="cannot be stored in NIfTI"):
        write_volume(out, np.ones((2, 2, 2)), read_volume(tmp_path / "h.npy"))
    assert list(out.parent.iterdir()) == []
    write_volume(out, np.ones((2, 2, 2)), vol)
    assert [p.name for p in out.parent.iterdir()] == ["b.nii.gz"]


def _folder(tmp_path: Path, names: list[str], shape: tuple[int, ...] = (4, 4, 4)) -> Path:
    root = tmp_path / "vols"
    root.mkdir()
    for i, name in enumerate(names):
        data = np.full(shape, i + 1, np.int16)
        if name.endswith(".npy"):
            np.save(root / name, data)
        else:
            nib.save(nib.Nifti1Image(data, np.eye(4)), root / name)
    return root


def test_splits_keep_each_subject_in_one_fold(tmp_path: Path) -> None:
    names = [f"sub-{s:02d}_{m}.nii.gz" for s in range(6) for m in ("T1w", "T2w")] + ["sub-06_T1w.npy"]
    root = _folder(tmp_path, names)
    table = build_splits(root, folds=3, seed=0)
    assert len(table) == 13 and set(table["fold"]) == {0, 1, 2}
    assert (table.groupby("subject")["fold"].nunique() == 1).all()
    assert table.set_index("item").loc["sub-03_T2w", "subject"] == "sub-03"
    path = write_splits(root, table)
    assert path == splits_path(root) and path.name == "mri_splits.csv"
    back = read_splits(root)
    assert back.equals(table.reset_index(drop=True))
    assert build_splits(root, folds=3, seed=0).equals(table)  # seeded
    with pytest.raises(DataError, match="7 subject"):
        build_splits(root, folds=8, seed=0)


def test_subjects_csv_overrides_the_pattern(tmp_path: Path) -> None:
    root = _folder(tmp_path, ["a.nii", "b.nii", "c.nii", "d.nii"])
    (root / "subjects.csv").write_text("file,subject\na.nii,007\nb.nii,007\nc.nii,8\nd.nii,9\n")
    table = build_splits(root, folds=2, seed=1)
    assert table.set_index("item")["subject"].to_dict() == {"a": "007", "b": "007", "c": "8", "d": "9"}
    assert table.set_index("item").loc["a", "fold"] == table.set_index("item").loc["b", "fold"]
    (root / "subjects.csv").write_text("file,subject\na.nii,1\nb.nii,2\nc.nii,3\n")
    with pytest.raises(DataError, match="no subject for d.nii"):
        build_splits(root, folds=2, seed=1)


def test_4d_scans_give_one_item_per_volume_with_volume4d_all(tmp_path: Path) -> None:
    root = _folder(tmp_path, ["s1_bold.nii", "s2_bold.nii"], shape=(4, 4, 4, 3))
    first = build_splits(root, folds=2, seed=0)
    assert first["item"].tolist() == ["s1_bold", "s2_bold"] and first["volume"].tolist() == [0, 0]
    every = build_splits(root, folds=2, seed=0, volume4d="all")
    assert every["item"].tolist() == [f"s{s}_bold_t{k}" for s in (1, 2) for k in range(3)]
    assert every["volume"].tolist() == [0, 1, 2] * 2
    assert (every.groupby("subject")["fold"].nunique() == 1).all()


def test_subject_pattern_rules() -> None:
    assert subject_of("sub-01_ses-2_T1w", r"^[^_]+") == "sub-01"
    assert subject_of("IXI002-Guys-0828-T1", r"^(?P<subject>IXI\d+)") == "IXI002"
    with pytest.raises(DataError, match="does not match"):
        subject_of("scan", r"^sub-")
    with pytest.raises(DataError, match="not a valid regex"):
        subject_of("scan", "(")
