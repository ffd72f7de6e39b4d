"""A contest-shaped benchmark set, rebuilt bit for bit from one command and material on disk.

The contest's geometry (HR 2048^2, LR 512^2 by MATLAB bicubic x1/4, 512/128 patches) with the hard
edges contest photos have: each HR image is a mosaic of 8 x 8 cells of 256^2, each cell a crop of one
bundled photo at its own resolution (a random window, one of the 8 dihedral transforms), or synthetic
line art (lines, polygons, circles) or text drawn at 4x and area-averaged (antialiased edges, as a
camera would see them). An image's photo cells all come from ONE photo: its ``source``, the unit of
every split. Photos are split into training and held-out sources before anything is cut (the held-out
ones are the lever set's: bench/levers.py), so the held-out images share no pixel with training; the
synthetic cells are drawn from the image's own seed and never repeat.

    python -m bench.contest_set --out data/contest-like      # 22 train + 7 held-out images, ~2 min

The layout is the contest's (train.csv with a ``source`` column, test.csv, train/lr, train/hr, test/lr,
sample_submission.zip) plus ``test_hr/`` (the held-out ground truth, for ``evaluate``), as demo-data writes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.core.images import encode_png, read_uint8
from pipeline.demo_data import Source, _downscale, _source_path, _write, _zip_bytes

HR = 2048
CELL = 256  # mosaic cells: 8 x 8 per image
SHARES = {"photo": 0.6, "lines": 0.2, "text": 0.2}  # what a cell shows
WORDS = ("SUPER", "resolution", "PSNR", "2048", "contest", "edge", "Tile", "x4", "bicubic", "ensemble", "kernel",
         "0123456789", "window", "Attention", "patch", "LR/HR", "sharp", "ONNX", "leaderboard", "#42")
FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX,
         cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_COMPLEX_SMALL, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX)
# (photo, images per photo): the lever set's sources (bench/levers.py), the same split
TRAIN = (("rocket.jpg", "skimage"), ("coffee.png", "skimage"), ("chelsea.png", "skimage"),
         ("retina.jpg", "skimage"), ("hubble_deep_field.jpg", "skimage"), ("ihc.png", "skimage"),
         ("cell.png", "skimage"), ("grass.png", "skimage"), ("gravel.png", "skimage"), ("coins.png", "skimage"),
         ("clock_motion.png", "skimage"))
HELD_OUT = (("astronaut.png", "skimage"), ("grace_hopper.jpg", "matplotlib"), ("motorcycle_left.png", "skimage"),
            ("motorcycle_right.png", "skimage"), ("camera.png", "skimage"), ("moon.png", "skimage"),
            ("brick.png", "skimage"))


@dataclass(frozen=True)
class Plan:
    source: Source
    images: int


def _rgb(photo: np.ndarray) -> np.ndarray:
    return np.repeat(photo[:, :, None], 3, axis=2) if photo.ndim == 2 else photo[:, :, :3]


def _photo_cell(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = photo.shape[:2]
    y, x = int(rng.integers(0, h - CELL + 1)), int(rng.integers(0, w - CELL + 1))
    cell = photo[y:y + CELL, x:x + CELL]
    k = int(rng.integers(8))
    cell = cell[:, ::-1] if k & 1 else cell
    cell = cell[::-1] if k & 2 else cell
    return np.ascontiguousarray(cell.transpose(1, 0, 2) if k & 4 else cell)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _lines_cell(rng: np.random.Generator) -> np.ndarray:
    """Lines, polygons and circles drawn at 4x, then area-averaged to the cell: antialiased hard edges."""
    big = CELL * 4
    canvas = np.empty((big, big, 3), np.uint8)
    canvas[:] = _colour(rng)
    for _ in range(int(rng.integers(6, 20))):
        kind, colour, width = int(rng.integers(4)), _colour(rng), int(rng.integers(2, 24))
        pts = rng.integers(-big // 4, big + big // 4, size=(int(rng.integers(3, 7)), 2)).astype(np.int32)
        if kind == 0:
            cv2.line(canvas, tuple(map(int, pts[0])), tuple(map(int, pts[1])), colour, width)
        elif kind == 1:
            cv2.fillPoly(canvas, [pts], colour)
        elif kind == 2:
            cv2.polylines(canvas, [pts], True, colour, width)
        else:
            cv2.circle(canvas, tuple(map(int, pts[0])), int(rng.integers(8, big // 3)), colour,
                       -1 if rng.random() < 0.5 else width)
    return cv2.resize(canvas, (CELL, CELL), interpolation=cv2.INTER_AREA)


def _text_cell(rng: np.random.Generator) -> np.ndarray:
    """Lines of words in a random Hershey font, size and colour, drawn at 4x and area-averaged."""
    big = CELL * 4
    canvas = np.empty((big, big, 3), np.uint8)
    canvas[:] = _colour(rng)
    y = int(rng.integers(40, 120))
    while y < big:
        scale, font = float(rng.uniform(1.2, 5.0)), FONTS[int(rng.integers(len(FONTS)))]
        words = " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), 4))
        cv2.putText(canvas, words, (int(rng.integers(-60, 40)), y), font, scale, _colour(rng),
                    int(rng.integers(2, 12)), cv2.LINE_AA)
        y += int(scale * 40) + int(rng.integers(10, 60))
    return cv2.resize(canvas, (CELL, CELL), interpolation=cv2.INTER_AREA)


def mosaic(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One (HR,HR,3) uint8 image: 8 x 8 cells drawn with ``SHARES``."""
    kinds = list(SHARES)
    out = np.empty((HR, HR, 3), np.uint8)
    for y in range(0, HR, CELL):
        for x in range(0, HR, CELL):
            kind = kinds[int(rng.choice(len(kinds), p=list(SHARES.values())))]
            cell = (_photo_cell(photo, rng) if kind == "photo" else _lines_cell(rng) if kind == "lines"
                    else _text_cell(rng))
            out[y:y + CELL, x:x + CELL] = cell
    return out


def plans(train_images: int, held_out_images: int) -> list[Plan]:
    return ([Plan(Source(name, package, (1, 1), "train"), train_images) for name, package in TRAIN]
            + [Plan(Source(name, package, (1, 1), "test"), held_out_images) for name, package in HELD_OUT])


def build(out: Path, seed: int = 0, train_images: int = 2, held_out_images: int = 1) -> None:
    """Write the set into ``out`` (a new folder; built beside it and renamed in at the end)."""
    if out.exists():
        raise SystemExit(f"{out}: exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build(tmp, seed, plans(train_images, held_out_images))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(out: Path, seed: int, todo: list[Plan]) -> None:
    train_rows, test_rows, sample = [], [], {}
    blank = encode_png(np.zeros((HR, HR, 3), np.uint8))
    with tqdm(total=sum(p.images for p in todo), desc="contest-like set", unit="img") as bar:
        for index, plan in enumerate(todo):
            photo = _rgb(read_uint8(_source_path(plan.source)))
            for k in range(plan.images):
                rng = np.random.default_rng([seed, index, k])  # each image its own stream: rebuilt bit for bit
                hr = mosaic(photo, rng)
                lr = _downscale(hr)
                if plan.source.split == "train":
                    img_id = f"{len(train_rows):04d}"
                    _write(out / "train" / "hr" / f"{img_id}.png", encode_png(hr))
                    _write(out / "train" / "lr" / f"{img_id}.png", encode_png(lr))
                    train_rows.append((img_id, f"train/lr/{img_id}.png", f"train/hr/{img_id}.png",
                                       plan.source.source))
                else:
                    img_id = f"{20000 + len(test_rows)}"
                    _write(out / "test" / "lr" / f"{img_id}.png", encode_png(lr))
                    _write(out / "test_hr" / f"{img_id}.png", encode_png(hr))
                    test_rows.append((img_id, f"test/lr/{img_id}.png", plan.source.source))
                    sample[f"{img_id}.png"] = blank
                bar.update()
    pd.DataFrame(train_rows, columns=["img_id", "lr_img_path", "hr_img_path", "source"]).to_csv(
        out / "train.csv", index=False)
    tests = pd.DataFrame(test_rows, columns=["img_id", "lr_img_path", "source"])
    tests[["img_id", "lr_img_path"]].to_csv(out / "test.csv", index=False)
    tests[["img_id", "source"]].to_csv(out / "test_sources.csv", index=False)  # for intervals over scenes
    _write(out / "sample_submission.zip", _zip_bytes(sample))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/contest-like"), help="folder to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=2, help="images per training photo")
    parser.add_argument("--held-out-images", type=int, default=1, help="images per held-out photo")
    args = parser.parse_args()
    build(args.out, args.seed, args.train_images, args.held_out_images)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
