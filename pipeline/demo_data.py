"""``demo-data``: a small dataset in the contest layout, built from photos that ship with packages.

The contest's geometry scaled down by 4 so that it runs on a CPU: HR 512x512, LR 128x128 (so
tiles of 32 with stride 16 give the reference's 49 tiles). HR images are crops of the colour
photographs bundled with scikit-image (and matplotlib's sample photo); LR images are MATLAB-style
bicubic x1/4 (basicsr's ``imresize``), rounded to uint8, exactly how SR benchmarks make them.

Sources are split before anything is cropped: the test photos never appear in training. Photos
whose shorter side is under 512 px are first enlarged with the same MATLAB bicubic so that a
512 crop fits (at most 1.28x; noted per source in ``train.csv``'s ``source`` column names).
The layout written to ``demo.out``:

    train.csv (img_id, lr_img_path, hr_img_path, source)   train/lr/0000.png   train/hr/0000.png
    test.csv  (img_id, lr_img_path)                        test/lr/20000.png
    sample_submission.zip (black 512x512 PNGs named like the test ids)
    test_hr/20000.png  (held-out ground truth, so the demo can score itself)
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import Config
from pipeline.core.errors import UserError
from pipeline.core.images import encode_png, read_uint8, to_uint8

HR_SIZE = 512
SCALE = 4
VERSION = 1  # bump when the recipe changes, so an old data/demo is rebuilt


@dataclass(frozen=True)
class Source:
    name: str  # file name inside its package's data folder
    package: str  # "skimage" or "matplotlib"
    grid: tuple[int, int]  # crops per axis (rows, columns), spread evenly over the photo
    split: str  # "train" or "test"

    @property
    def source(self) -> str:
        """The scene it shows, the unit of every split (a stereo pair's two photos are one scene)."""
        return Path(self.name).stem.removesuffix("_left").removesuffix("_right")


SOURCES = (
    Source("retina.jpg", "skimage", (2, 2), "train"),
    Source("hubble_deep_field.jpg", "skimage", (1, 2), "train"),
    Source("grace_hopper.jpg", "matplotlib", (1, 1), "train"),
    Source("ihc.png", "skimage", (1, 1), "train"),
    Source("coffee.png", "skimage", (1, 1), "train"),
    Source("rocket.jpg", "skimage", (1, 1), "train"),
    Source("astronaut.png", "skimage", (1, 1), "test"),
    Source("motorcycle_left.png", "skimage", (1, 1), "test"),
    Source("motorcycle_right.png", "skimage", (1, 1), "test"),
)


def _source_path(src: Source) -> Path:
    if src.package == "skimage":
        import skimage

        return Path(skimage.__file__).parent / "data" / src.name
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / src.name


def _downscale(hr: np.ndarray) -> np.ndarray:
    """(S,S,3) uint8 -> (S/4,S/4,3) uint8 with MATLAB bicubic (antialiased), rounded once."""
    from pipeline.core.compat import imresize

    return to_uint8(imresize(hr.astype(np.float64) / 255.0, 1 / SCALE))


def _fit(photo: np.ndarray, size: int) -> np.ndarray:
    """Enlarge (MATLAB bicubic) a photo whose shorter side is below ``size``; others unchanged."""
    short = min(photo.shape[:2])
    if short >= size:
        return photo
    from pipeline.core.compat import imresize

    return to_uint8(imresize(photo.astype(np.float64) / 255.0, size / short))[:, :, :3]


def _crops(photo: np.ndarray, grid: tuple[int, int], rng: np.random.Generator, size: int) -> list[np.ndarray]:
    """``grid`` crops of ``size``, evenly spread, each moved by a seeded jitter of up to 32 px."""
    h, w = photo.shape[:2]
    out = []
    for y in np.linspace(0, h - size, grid[0]).round().astype(int):
        for x in np.linspace(0, w - size, grid[1]).round().astype(int):
            y2 = int(np.clip(y + rng.integers(-32, 33), 0, h - size))
            x2 = int(np.clip(x + rng.integers(-32, 33), 0, w - size))
            out.append(photo[y2 : y2 + size, x2 : x2 + size])
    return out


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    """A zip with fixed timestamps, so the same content gives the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def build(out: Path, seed: int, sources: tuple[Source, ...] = SOURCES, size: int = HR_SIZE) -> None:
    """Write the demo dataset (or another set of ``sources`` cut into HR crops of ``size``) into ``out``,
    which must not exist yet."""
    rng = np.random.default_rng(seed)
    train_rows, test_rows, sample = [], [], {}
    for src in sources:
        path = _source_path(src)
        photo = _fit(read_uint8(path), size)
        for hr in _crops(photo, src.grid, rng, size):
            lr = _downscale(hr)
            source = src.source
            if src.split == "train":
                img_id = f"{len(train_rows):04d}"
                _write(out / "train" / "hr" / f"{img_id}.png", encode_png(hr))
                _write(out / "train" / "lr" / f"{img_id}.png", encode_png(lr))
                train_rows.append((img_id, f"train/lr/{img_id}.png", f"train/hr/{img_id}.png", source))
            else:
                img_id = f"{20000 + len(test_rows)}"
                _write(out / "test" / "lr" / f"{img_id}.png", encode_png(lr))
                _write(out / "test_hr" / f"{img_id}.png", encode_png(hr))
                test_rows.append((img_id, f"test/lr/{img_id}.png"))
                sample[f"{img_id}.png"] = encode_png(np.zeros((size, size, 3), np.uint8))
    pd.DataFrame(train_rows, columns=["img_id", "lr_img_path", "hr_img_path", "source"]).to_csv(
        out / "train.csv", index=False)
    pd.DataFrame(test_rows, columns=["img_id", "lr_img_path"]).to_csv(out / "test.csv", index=False)
    _write(out / "sample_submission.zip", _zip_bytes(sample))
    _write(out / "demo.json", json.dumps({"seed": seed, "version": VERSION}).encode())


def tree_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes (to compare two builds)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def ensure_demo_data(out: str | Path, seed: int) -> Path:
    """Build the demo dataset at ``out`` unless one with the same seed and recipe is there.

    The build happens in a temporary folder beside ``out`` that is renamed into place at the
    end, so an interrupted build never leaves a half-written dataset.
    """
    out = Path(out)
    marker = out / "demo.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == {"seed": seed, "version": VERSION}:
                return out
        except json.JSONDecodeError:
            pass
    if out.exists() and not marker.is_file():
        raise UserError(f"{out}: exists and is not a demo dataset; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp, seed)
        if out.exists():
            shutil.rmtree(out)  # an older demo build (other seed or recipe)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(cfg: Config) -> None:
    out = ensure_demo_data(cfg.demo.out, cfg.demo.seed)
    n_train = len(pd.read_csv(out / "train.csv"))
    n_test = len(pd.read_csv(out / "test.csv"))
    print(f"demo dataset: {out} ({n_train} train pairs, {n_test} test images, LR 128 -> HR 512)")
