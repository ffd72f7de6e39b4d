from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.files import WriteError
from pipeline.core.images import ImageError, atomic_write, read_float, read_uint8, to_uint8, write_png

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (9, 7, 3), dtype=np.uint8)


def _save(path: Path, bgr_or_gray: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), bgr_or_gray)
    return path


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_lossless_formats_round_trip(tmp_path: Path, suffix: str):
    p = _save(tmp_path / f"a{suffix}", RGB[:, :, ::-1])
    assert np.array_equal(read_uint8(p), RGB)


def test_jpeg_reads_as_rgb(tmp_path: Path):
    reddish = np.zeros((16, 16, 3), np.uint8) + np.array([200, 60, 20], np.uint8)  # RGB
    img = read_uint8(_save(tmp_path / "a.jpg", reddish[:, :, ::-1]))
    assert img.shape == (16, 16, 3) and np.abs(img.astype(int) - reddish).max() <= 3  # RGB, not BGR


def test_gray_alpha_and_16_bit_rules(tmp_path: Path):
    gray = RGB[:, :, 0]
    assert np.array_equal(read_uint8(_save(tmp_path / "g.png", gray)), np.repeat(gray[:, :, None], 3, 2))
    rgba = np.dstack([RGB[:, :, ::-1], np.full(gray.shape, 7, np.uint8)])  # alpha is dropped
    assert np.array_equal(read_uint8(_save(tmp_path / "rgba.png", rgba)), RGB)
    rgb16 = RGB.astype(np.uint16) * 257  # exact 8 -> 16 bit expansion
    p16 = _save(tmp_path / "16.png", rgb16[:, :, ::-1])
    assert np.array_equal(read_uint8(p16), RGB)
    assert read_float(p16).dtype == np.float32 and np.allclose(read_float(p16), RGB / 255.0, atol=1e-6)


def test_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ImageError, match="missing.png: file not found"):
        read_uint8(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png: cannot decode"):
        read_uint8(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: file is empty"):
        read_uint8(empty)


def test_write_png_is_atomic(tmp_path: Path):
    target = tmp_path / "out" / "x.png"
    write_png(target, RGB)
    assert np.array_equal(read_uint8(target), RGB)
    with pytest.raises(ImageError):
        write_png(tmp_path / "out" / "y.png", RGB.astype(np.float32))
    with pytest.raises(WriteError, match="z.bin: cannot write it .RuntimeError: crash mid-write"):  # one line
        with atomic_write(tmp_path / "out" / "z.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png"]  # no temp, no z.bin


def test_to_uint8_rounds_once():
    x = np.array([[-0.1, 0.0, 0.5 / 255, 1.49 / 255, 1.0, 1.2]])
    assert to_uint8(x).tolist() == [[0, 0, 0, 1, 255, 255]]
