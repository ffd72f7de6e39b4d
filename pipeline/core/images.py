"""Image IO for the whole project: one reader, one atomic writer, errors that name the file.

Reading rules (documented in docs/data.md, "Image files"):
- PNG, JPEG, BMP and TIFF, 8- or 16-bit, gray, gray+alpha, RGB or RGBA.
- Gray is replicated to three channels.
- Alpha is dropped: the colour channels are used as stored, as OpenCV's and PIL's RGB
  conversions do, so a contest PNG saved with an opaque alpha channel scores the same.
- 16-bit values map to 8 bit by rounding v / 257 (65535 -> 255), the exact inverse of the
  usual 8 -> 16 bit expansion v * 257; ``read_float`` keeps the full 16-bit precision.
- At most ``max_pixels()`` pixels (``data.max_pixels``, default 8192 x 8192), checked from the
  file's header before anything is decoded: a small file that claims a huge size (or a real
  huge photo) is refused in one line instead of exhausting memory. The file's size is checked
  before it is read: no image within the cap needs more than ``max_file_bytes()`` (8 bytes a
  pixel, 16-bit RGBA uncompressed, plus room for metadata), so a 3 GB file is never read whole.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from pipeline.core.config import DataConfig
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write

# Image sizes are checked against our own cap (check_pixels), set by data.max_pixels; PIL's
# separate decompression-bomb warning would only add noise before it.
Image.MAX_IMAGE_PIXELS = None

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
Key = TypeVar("Key")


class ImageError(UserError):
    """An image that is missing, unreadable or of the wrong shape; the message names the file."""


_limits = {"max_pixels": DataConfig().max_pixels}  # until the CLI sets data.max_pixels


def set_max_pixels(limit: int) -> None:
    """The pixel cap of every image read in this process (the CLI sets it from ``data.max_pixels``)."""
    if limit < 1:
        raise UserError(f"data.max_pixels={limit} must be >= 1")
    _limits["max_pixels"] = int(limit)


def max_pixels() -> int:
    return _limits["max_pixels"]


def check_pixels(width: int, height: int, where: str | Path) -> None:
    """Refuse an image larger than the pixel cap, naming it and the setting that raises the cap."""
    if width * height > max_pixels():
        raise ImageError(f"{where}: image is {width}x{height} = {width * height} pixels, more than "
                         f"data.max_pixels={max_pixels()}; raise it if the image is genuine")


def max_file_bytes() -> int:
    """The largest image file worth reading under the pixel cap: 16-bit RGBA uncompressed (8 bytes a
    pixel) with 1% of encoding overhead, plus 16 MiB of metadata (EXIF, ICC profiles, thumbnails)."""
    return max_pixels() * 8 * 101 // 100 + 16 * 2**20


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file's header (PIL reads headers lazily: no pixel is decoded), or
    None when PIL does not know the format (OpenCV may still: it has its own 2^30-pixel cap)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # unknown or corrupt header: OpenCV's decode below gives the error
        return None


def _decode(path: Path) -> np.ndarray:
    """Raw decoded array (H,W) or (H,W,C) in OpenCV's channel order, any bit depth."""
    if not path.is_file():
        raise ImageError(f"{path}: file not found" if not path.is_dir() else f"{path}: is a folder, not an image")
    nbytes = path.stat().st_size
    if nbytes > max_file_bytes():
        raise ImageError(f"{path}: file is {nbytes} bytes, more than any image within data.max_pixels="
                         f"{max_pixels()} needs ({max_file_bytes()}); refused before reading it")
    data = path.read_bytes()  # (imdecode of the bytes also handles non-ASCII paths; cv2.imread does not)
    if not data:
        raise ImageError(f"{path}: file is empty")
    size = _header_size(data)
    if size is not None:
        check_pixels(*size, path)
    import cv2  # here, not at the top: stages check folders with this module before they compute

    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageError(f"{path}: cannot decode image ({str(exc).strip().splitlines()[-1][:200]})") from None
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
    import cv2  # as in _decode

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
        raise ImageError(f"{folder}: is a file, not a folder of images" if folder.exists() else
                         f"{folder}: folder not found")
    # Hidden files are skipped: our own temporary files, and macOS's ._ resource forks.
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


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


def read_ahead(items: Iterable[tuple[Key, Any]], read: Callable[[Any], Any] = read_float,
               depth: int = 2, workers: int = 1) -> Iterator[tuple[Key, Any]]:
    """Yield ``(key, read(path))`` in the order given while the next ``depth`` images decode in
    ``workers`` threads.

    A reading error is raised here, when that image's turn comes, exactly as ``read`` raised it;
    closing the iterator early cancels the reads not yet started.
    """
    source = iter(items)
    pending: deque[tuple[Key, Future[Any]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-ahead") as pool:
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
    # An OSError (disk full, permissions) is raised as it is: the CLI words every OS error in one place.
    write_png(path, img if img.dtype == np.uint8 else to_uint8(img))


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
