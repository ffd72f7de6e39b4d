"""``add-data``: extra training pairs from a folder of HR photos, made the way the contest made its LR.

    python -m pipeline add-data --from DIR_OF_HR_PHOTOS --data DIR [add_data.name=NAME]
                                [add_data.blur=1.0 add_data.noise=2 add_data.jpeg=90]

Each photo becomes one pair: HR = the photo cropped at the bottom/right to a multiple of
``data.scale``; LR = MATLAB bicubic x1/scale of it (basicsr's ``imresize``, antialiased), rounded
to uint8 once, exactly like the demo's and the SR benchmarks' LR. Optional degradations, for
robustness to test images that were not made so cleanly (basicsr's implementations, seeded per
photo, so a re-run gives the same bytes): an isotropic Gaussian blur of the HR before the
downscale (``add_data.blur``, sigma in HR pixels), Gaussian noise on the LR (``add_data.noise``, 8-bit
levels), then JPEG compression of the LR (``add_data.jpeg``, quality).

Written under ``--data`` (``pipeline.core.layout``): ``extra/<name>/{lr,hr}/<name>_<stem>.png`` (the
folder is built aside and swapped in whole; a re-run replaces the set of the same name) and its
rows in ``extra.csv`` (img_id, source ``extra/<name>``, lr_path, hr_path). ``prepare`` then puts
them in splits.csv with fold -1: ``patchify`` cuts them and ``train`` learns from them, but no
validation, leaderboard or ablation ever scores on them (validation folds are >= 0), so the held-
out measurement stays honest.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.config import AddDataConfig, Config, save_config
from pipeline.core.errors import DataError, UserError
from pipeline.core.files import atomic_write, staged_dir
from pipeline.core.images import images_by_stem, read_uint8, to_uint8, write_png
from pipeline.core.layout import EXTRA_COLUMNS, DataLayout, check_id
from pipeline.core.locks import data_lock
from pipeline.core.workers import process_pool

STAMP = "add-data.yaml"  # the resolved settings, written into every set this stage makes


def degrade(hr: np.ndarray, scale: int, opts: AddDataConfig, seed: int) -> np.ndarray:
    """(H,W,3) uint8 HR -> (H/scale,W/scale,3) uint8 LR: [blur], bicubic x1/scale, [noise], [JPEG]; rounded once."""
    import cv2

    from pipeline.core.compat import add_gaussian_noise, add_jpg_compression, bivariate_Gaussian, imresize

    x = hr.astype(np.float64) / 255.0
    if opts.blur > 0:
        size = 2 * int(np.ceil(3 * opts.blur)) + 1  # +-3 sigma
        kernel = bivariate_Gaussian(size, opts.blur, opts.blur, 0, isotropic=True)
        x = cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    lr = imresize(x, 1 / scale)  # (H,W,3) -> (H/scale,W/scale,3), MATLAB bicubic
    if opts.noise > 0:
        np.random.seed(seed)  # basicsr draws from numpy's global generator: seed it per photo
        lr = add_gaussian_noise(lr.astype(np.float32), sigma=opts.noise, clip=True)
    if opts.jpeg > 0:
        # OpenCV encodes in BGR order: hand it BGR so the chroma planes are the real ones
        lr = add_jpg_compression(np.ascontiguousarray(lr[:, :, ::-1], dtype=np.float32), opts.jpeg)[:, :, ::-1]
    return to_uint8(np.clip(lr, 0, 1))


def _make_pair(job: tuple) -> tuple[str, int, int]:
    """Read one photo, write its HR and LR into the staged set; (id, HR width, HR height)."""
    photo, img_id, stage, scale, opts, seed = job
    hr = read_uint8(photo)
    h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
    if min(h, w) < 4 * scale:
        raise DataError(f"{photo}: {hr.shape[1]}x{hr.shape[0]} is too small for a x{scale} pair")
    hr = np.ascontiguousarray(hr[:h, :w])
    write_png(Path(stage) / "hr" / f"{img_id}.png", hr)
    write_png(Path(stage) / "lr" / f"{img_id}.png", degrade(hr, scale, opts, seed))
    return img_id, w, h


def main(cfg: Config) -> None:
    opts = cfg.add_data
    if not opts.source:
        raise UserError("add-data needs --from DIR (a folder of HR photos)")
    data = DataLayout(Path(cfg.data.dir))
    data.check_exists()
    with data_lock(data.root, "add-data"):  # extra.csv is read at the start and rewritten at the end
        _add_set(cfg, data)


def _add_set(cfg: Config, data: DataLayout) -> None:
    opts = cfg.add_data
    source = Path(opts.source)
    name = check_id(opts.name or source.resolve().name, "add_data.name", "set name")
    photos = images_by_stem(source, "HR photo")
    import pandas as pd  # once the settings and folders are checked

    ids = {stem: check_id(f"{name}_{stem}", str(source)) for stem in photos}
    others = data.extra_table()
    others = others[others["source"] != f"extra/{name}"]
    taken = set(others["img_id"])
    if data.train_csv.is_file() or (data.root / "train").is_dir():
        taken |= set(data.train_table()["img_id"])
    clash = sorted(set(ids.values()) & taken)
    if clash:
        raise DataError(f"{source}: id {clash[0]!r} is already a training image of {data.root}; "
                        "choose another add_data.name")

    target = data.extra_dir(name)
    with staged_dir(target, STAMP) as stage:
        jobs = [(path, ids[stem], str(stage), cfg.data.scale, opts, zlib.crc32(f"{cfg.seed}/{stem}".encode()))
                for stem, path in photos.items()]
        if opts.workers > 1 and len(jobs) > 1:
            with process_pool(opts.workers) as pool:
                made = list(tqdm(pool.map(_make_pair, jobs), total=len(jobs), desc="add-data", unit="img"))
        else:
            made = [_make_pair(job) for job in tqdm(jobs, desc="add-data", unit="img")]
        save_config(cfg, stage / STAMP, sections=("data", "add_data"))

    rel = target.relative_to(data.root).as_posix()
    rows = pd.DataFrame([(i, f"extra/{name}", f"{rel}/lr/{i}.png", f"{rel}/hr/{i}.png") for i, _w, _h in made],
                        columns=list(EXTRA_COLUMNS))
    table = pd.concat([others, rows], ignore_index=True) if len(others) else rows
    with atomic_write(data.extra_csv) as tmp:
        table.to_csv(tmp, index=False)
    degradations = [f"{k}={getattr(opts, k)}" for k in ("blur", "noise", "jpeg") if getattr(opts, k)]
    print(f"{len(made)} extra pair(s) '{name}' -> {target} (LR = bicubic x1/{cfg.data.scale}"
          f"{', ' + ', '.join(degradations) if degradations else ''}); {len(table)} extra pair(s) in "
          f"{data.extra_csv}. Run `python -m pipeline prepare --data {data.root}` to include them "
          "(training only, never validation).")
