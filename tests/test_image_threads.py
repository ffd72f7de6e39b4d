"""Threaded image IO: read_ahead keeps the order and raises a reading error at its turn; PngWriter
writes in the background, raises a failed write in the caller's thread, and leaves no partial file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import pipeline.core.files as files
from pipeline.core.images import ImageError, PngWriter, read_ahead, read_uint8, to_uint8, write_png

RNG = np.random.default_rng(0)


def _images(n: int) -> list[np.ndarray]:
    return [RNG.integers(0, 256, (6 + i, 5, 3), dtype=np.uint8) for i in range(n)]


def test_read_ahead_keeps_order_and_reads_before_it_is_asked(tmp_path: Path) -> None:
    imgs = _images(5)
    paths = [write_png(tmp_path / f"{i}.png", img) for i, img in enumerate(imgs)]
    threads: list[str] = []
    second_read = threading.Event()

    def read(path: Path) -> np.ndarray:
        threads.append(threading.current_thread().name)
        if path.stem == "1":
            second_read.set()
        return read_uint8(path)

    stream = read_ahead([(f"id{i}", p) for i, p in enumerate(paths)], read=read)
    first = next(stream)
    assert second_read.wait(5)  # image 1 was decoded while image 0 was being used
    got = [first, *stream]
    assert [k for k, _ in got] == [f"id{i}" for i in range(5)]
    assert all(np.array_equal(a, b) for (_, a), b in zip(got, imgs))
    assert threading.current_thread().name not in threads


def test_read_ahead_raises_a_bad_image_at_its_turn(tmp_path: Path) -> None:
    good = write_png(tmp_path / "good.png", _images(1)[0])
    stream = read_ahead([("a", good), ("b", tmp_path / "missing.png"), ("c", good)])
    assert next(stream)[0] == "a"
    with pytest.raises(ImageError, match="missing.png: file not found"):
        next(stream)


def test_writer_writes_everything_in_the_background(tmp_path: Path) -> None:
    imgs = _images(6)
    floats = RNG.random((7, 4, 3)) * 1.2 - 0.1  # unclamped floats: rounded and clipped like to_uint8
    with PngWriter(workers=2, depth=2) as writer:
        for i, img in enumerate(imgs):
            writer.write(tmp_path / f"{i}.png", img)
        writer.write(tmp_path / "f.png", floats)
    for i, img in enumerate(imgs):
        assert np.array_equal(read_uint8(tmp_path / f"{i}.png"), img)
    assert np.array_equal(read_uint8(tmp_path / "f.png"), to_uint8(floats))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(f"{i}.png" for i in range(6)), "f.png"])


def test_writer_error_surfaces_in_the_caller_and_leaves_nothing_half_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def disk_full_on_b(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == "b.png":  # the temporary file is written, then the rename fails
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", disk_full_on_b)
    imgs = _images(3)
    # one write-error path (pipeline.core.files.WriteError): the file, the disk full, the free space
    with pytest.raises(files.WriteError, match=r"b\.png: No space left on device \(.* free on "):
        with PngWriter(workers=1, depth=8) as writer:
            for name, img in zip("abc", imgs):
                writer.write(tmp_path / f"{name}.png", img)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "b.png" not in left and not [n for n in left if n.endswith(".tmp")]
    assert np.array_equal(read_uint8(tmp_path / "a.png"), imgs[0])  # what finished is complete

    bad = np.zeros((4, 4, 4), np.uint8)  # four channels: the encoder refuses it
    writer = PngWriter()
    writer.write(tmp_path / "x.png", bad)
    with pytest.raises(ImageError, match=r"x\.png: expected \(H,W,3\) uint8"):
        writer.close()
    assert not (tmp_path / "x.png").exists()
