"""Image IO for the whole project: one reader, one atomic writer, errors that name the file.

Reading rules (documented in the README):
- PNG, JPEG, BMP and TIFF, 8- or 16-bit, gray, gray+alpha, RGB or RGBA.
- Gray is replicated to three channels.
- Alpha is dropped: the colour channels are used as stored, as OpenCV's and PIL's RGB
  conversions do, so a contest PNG saved with an opaque alpha channel scores the same.
- 16-bit values map to 8 bit by rounding v / 257 (65535 -> 255), the exact inverse of the
  usual 8 -> 16 bit expansion v * 257; ``read_float`` keeps the full 16-bit precision.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import cv2
import numpy as np

from pipeline.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
Key = TypeVar("Key")


class ImageError(UserError):
    """An image that is missing, unreadable or of the wrong shape; the message names the file."""


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves at most a hidden temp file
    (removed here on any exception) instead of a truncated PNG, zip or checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _decode(path: Path) -> np.ndarray:
    """Raw decoded array (H,W) or (H,W,C) in OpenCV's channel order, any bit depth."""
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    # np.fromfile + imdecode also handles non-ASCII paths, which cv2.imread does not.
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ImageError(f"{path}: file is empty")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError(f"{path}: cannot decode image (corrupt or unsupported format)")
    return img


def _to_rgb(img: np.ndarray, path: Path) -> np.ndarray:
    """(H,W) / (H,W,2) / (H,W,3) / (H,W,4) in BGR(A) order -> (H,W,3) RGB, same dtype."""
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3:
        raise ImageError(f"{path}: unsupported array shape {img.shape}")
    channels = img.shape[2]
    if channels == 1:
        return np.repeat(img, 3, axis=2)
    if channels == 2:  # gray + alpha: drop alpha
        return np.repeat(img[:, :, :1], 3, axis=2)
    if channels in (3, 4):
        return np.ascontiguousarray(img[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped
    raise ImageError(f"{path}: unsupported channel count {channels}")


def read_uint8(path: str | Path) -> np.ndarray:
    """Read an image as (H,W,3) uint8 RGB, the contest's pixel format."""
    path = Path(path)
    img = _to_rgb(_decode(path), path)
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return np.round(img.astype(np.float64) / 257.0).astype(np.uint8)
    raise ImageError(f"{path}: unsupported pixel type {img.dtype} (expected 8 or 16 bit)")


def read_float(path: str | Path) -> np.ndarray:
    """Read an image as (H,W,3) float32 RGB in [0, 1], keeping 16-bit precision."""
    path = Path(path)
    img = _to_rgb(_decode(path), path)
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    raise ImageError(f"{path}: unsupported pixel type {img.dtype} (expected 8 or 16 bit)")


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image, decoding it (so a corrupt file is caught here)."""
    img = _decode(Path(path))
    return int(img.shape[0]), int(img.shape[1])


def encode_png(img: np.ndarray, path: str | Path = "<memory>") -> bytes:
    """(H,W,3) uint8 RGB -> PNG bytes."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ImageError(f"{path}: expected (H,W,3) uint8, got {img.shape} {img.dtype}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img[:, :, ::-1]))
    if not ok:
        raise ImageError(f"{path}: PNG encoding failed")
    return buf.tobytes()


def write_png(path: str | Path, img: np.ndarray) -> Path:
    """Write (H,W,3) uint8 RGB as PNG atomically (temporary file, then rename)."""
    data = encode_png(img, path)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1] -> uint8, rounding once (the only place predictions are quantised)."""
    return np.clip(np.round(img.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def images_by_stem(folder: str | Path, role: str = "image") -> dict[str, Path]:
    """{file stem: path} of the images in ``folder``; none, or two files sharing a stem, is an error.

    Stems are what predictions and ground truth are matched by (and what SR PNGs are named by).
    """
    folder = Path(folder)
    stems: dict[str, Path] = {}
    for p in list_images(folder):
        if p.stem in stems:
            raise ImageError(f"{folder}: two {role} files with the stem {p.stem!r}: {stems[p.stem].name}, {p.name}")
        stems[p.stem] = p
    if not stems:
        raise ImageError(f"{folder}: no {role} images found (png, jpg, bmp, tif)")
    return stems


# ---------------------------------------------------------------------------------------------
# Decoding and encoding off the main thread, so the device never waits for the disk. OpenCV and
# numpy release the GIL while they decode, encode and round, so threads are enough.


def read_ahead(items: Iterable[tuple[Key, Path]], read: Callable[[Path], np.ndarray] = read_float,
               depth: int = 2) -> Iterator[tuple[Key, np.ndarray]]:
    """Yield ``(key, read(path))`` in the order given while the next ``depth`` images decode in a thread.

    A reading error is raised here, when that image's turn comes, exactly as ``read`` raised it;
    closing the iterator early cancels the reads not yet started.
    """
    source = iter(items)
    pending: deque[tuple[Key, Future[np.ndarray]]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        def fill() -> None:
            while len(pending) < depth:
                item = next(source, None)
                if item is None:
                    return
                pending.append((item[0], pool.submit(read, item[1])))

        try:
            fill()
            while pending:
                key, future = pending.popleft()
                img = future.result()
                fill()  # the next read starts before this image is handed out
                yield key, img
        finally:
            for _key, future in pending:
                future.cancel()


def _write_any(path: Path, img: np.ndarray) -> None:
    try:
        write_png(path, img if img.dtype == np.uint8 else to_uint8(img))
    except OSError as exc:  # disk full, permissions, a folder in the way: one line naming the file
        raise ImageError(f"{path}: cannot write: {exc.strerror or exc}") from exc


class PngWriter:
    """Round, encode and write PNGs atomically in background threads; at most ``depth`` wait.

    ``write(path, img)`` takes (H,W,3) uint8, or floats in [0,1] that it rounds with ``to_uint8``
    (the one rounding of a prediction), and returns at once. The first failed write is raised in
    the caller's thread, as the writer raised it, by the next ``write`` or by ``close``; writes not
    started by then are cancelled. Every file goes through ``write_png`` (temporary file, then
    rename), so a failure leaves no partial file. As a context manager, leaving the block waits
    for every queued write (or, when the block raised, cancels those not started).
    """

    def __init__(self, workers: int = 2, depth: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png-writer")
        self._pending: deque[Future[None]] = deque()
        self._depth = max(1, depth)

    def write(self, path: str | Path, img: np.ndarray) -> None:
        self._reap(self._depth - 1)  # bounded memory: wait while too many images are queued
        self._pending.append(self._pool.submit(_write_any, Path(path), img))

    def _reap(self, keep: int) -> None:
        """Collect finished writes (waiting until at most ``keep`` are pending); raise the first failure."""
        while self._pending and (len(self._pending) > keep or self._pending[0].done()):
            future = self._pending.popleft()
            try:
                future.result()
            except BaseException:
                self._cancel()
                raise

    def _cancel(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()

    def close(self) -> None:
        """Wait for every queued write; raise the first failure."""
        try:
            self._reap(0)
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller failed: finish what is running, start nothing new, keep the caller's error
            self._cancel()
            self._pool.shutdown(wait=True)
