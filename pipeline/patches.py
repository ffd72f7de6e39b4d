"""``patchify``: cut every training pair into aligned LR/HR patches (the patchify package).

Geometry: ``patch.size`` and ``patch.stride`` are HR pixels and must divide by the scale; the
LR grid uses size/scale and stride/scale, so LR patch (y, x) covers exactly HR (scale*y, scale*x).
The default 512/512 on 2048^2 HR gives the reference team's 16 patches per image.

Edges that do not divide (``patch.edge``): ``shift`` adds a last row/column of patches flush with
the bottom/right edge (overlapping its neighbour), so every pixel is used; ``drop`` leaves the
remainder out, as patchify itself does.

Output in ``<data>/patches/``: ``lr/<patch_id>.png``, ``hr/<patch_id>.png``, ``manifest.csv``
(patch_id, img_id, fold, y, x, lr_path, hr_path; y, x = LR top-left), ``config.yaml``.
Idempotent: each finished image leaves ``done/<img_id>.csv``; a re-run skips those, and a change
of geometry or of splits.csv rebuilds everything.
"""

from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from patchify import patchify
from tqdm import tqdm

from pipeline.config import Config, PatchConfig, save_config, to_dict
from pipeline.errors import UserError
from pipeline.images import atomic_write, encode_png, read_uint8

MANIFEST_COLUMNS = ["patch_id", "img_id", "fold", "y", "x", "lr_path", "hr_path"]


def grid(length: int, size: int, stride: int, edge: str) -> list[int]:
    """Start offsets of patches along one axis (patchify's grid, plus a flush edge for 'shift')."""
    if size > length:
        return []
    starts = list(range(0, length - size + 1, stride))
    if edge == "shift" and starts[-1] != length - size:
        starts.append(length - size)
    return starts


def _cut(img: np.ndarray, size: int, stride: int, edge: str) -> dict[tuple[int, int], np.ndarray]:
    """{(y, x): patch} for one image. The regular grid comes from patchify in one call; with
    'shift', the flush bottom row / right column / corner come from patchify on the edge strips."""
    h, w = img.shape[:2]
    shape = (size, size, 3)
    out: dict[tuple[int, int], np.ndarray] = {}
    # (ny, nx, 1, size, size, 3): patchify's view of the regular grid
    regular = patchify(img, shape, step=stride)
    for i in range(regular.shape[0]):
        for j in range(regular.shape[1]):
            out[(i * stride, j * stride)] = regular[i, j, 0]
    if edge == "shift":
        ys, xs = grid(h, size, stride, edge), grid(w, size, stride, edge)
        bottom, right = h - size, w - size
        if ys[-1] == bottom and bottom % stride:
            strip = patchify(img[bottom:], shape, step=stride)  # (1, nx, 1, ...)
            for j in range(strip.shape[1]):
                out[(bottom, j * stride)] = strip[0, j, 0]
        if xs[-1] == right and right % stride:
            strip = patchify(img[:, right:], shape, step=stride)  # (ny, 1, 1, ...)
            for i in range(strip.shape[0]):
                out[(i * stride, right)] = strip[i, 0, 0]
        if (bottom % stride) and (right % stride):
            out[(bottom, right)] = img[bottom:, right:]
    return out


def _patch_image(job: tuple) -> list[tuple]:
    """Cut one LR/HR pair, write its PNGs, return its manifest rows (run in a worker)."""
    root, out, img_id, fold, lr_rel, hr_rel, lr_size, lr_stride, scale, edge = job
    lr = read_uint8(Path(root) / lr_rel)
    hr = read_uint8(Path(root) / hr_rel)
    if hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
        raise UserError(f"{Path(root) / hr_rel}: HR {hr.shape[1]}x{hr.shape[0]} is not {scale}x LR "
                        f"{lr.shape[1]}x{lr.shape[0]} (run prepare first)")
    if lr_size > min(lr.shape[:2]):
        raise UserError(f"{Path(root) / lr_rel}: LR {lr.shape[1]}x{lr.shape[0]} is smaller than the "
                        f"patch ({lr_size}); lower patch.size")
    lr_patches = _cut(lr, lr_size, lr_stride, edge)
    hr_patches = _cut(hr, lr_size * scale, lr_stride * scale, edge)
    rows = []
    for (y, x), lr_patch in sorted(lr_patches.items()):
        patch_id = f"{img_id}_{y:04d}_{x:04d}"
        hr_patch = hr_patches[(y * scale, x * scale)]
        for kind, patch in (("lr", lr_patch), ("hr", hr_patch)):
            with atomic_write(Path(out) / kind / f"{patch_id}.png") as tmp:
                tmp.write_bytes(encode_png(np.ascontiguousarray(patch)))
        rows.append((patch_id, img_id, fold, y, x, f"lr/{patch_id}.png", f"hr/{patch_id}.png"))
    with atomic_write(Path(out) / "done" / f"{img_id}.csv") as tmp:
        pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(tmp, index=False)
    return rows


def _fingerprint(cfg: Config, splits_path: Path) -> dict:
    """What the patches depend on: geometry and the exact splits file."""
    return {"patch": {k: v for k, v in to_dict(cfg.patch).items() if k != "workers"},
            "scale": cfg.data.scale,
            "splits_sha256": hashlib.sha256(splits_path.read_bytes()).hexdigest()}


def check_geometry(patch: PatchConfig, scale: int) -> tuple[int, int]:
    """(LR size, LR stride) from the HR settings, or a UserError naming the bad setting."""
    stride = patch.stride or patch.size
    for key, value in (("patch.size", patch.size), ("patch.stride", stride)):
        if value <= 0 or value % scale:
            raise UserError(f"{key}={value} must be a positive multiple of the scale ({scale}) at HR scale")
    if stride > patch.size:
        raise UserError(f"patch.stride={stride} is larger than patch.size={patch.size}: pixels would be skipped")
    return patch.size // scale, stride // scale


def main(cfg: Config) -> None:
    root = Path(cfg.data.dir)
    splits_path = root / "splits.csv"
    if not splits_path.is_file():
        raise UserError(f"{splits_path}: not found; run `python -m pipeline prepare --data {root}` first")
    lr_size, lr_stride = check_geometry(cfg.patch, cfg.data.scale)
    splits = pd.read_csv(splits_path, dtype={"img_id": str})
    out = root / "patches"
    fingerprint = _fingerprint(cfg, splits_path)
    stamp = out / "fingerprint.yaml"
    if out.exists() and (not stamp.is_file() or yaml.safe_load(stamp.read_text()) != fingerprint):
        print(f"{out}: settings or splits changed; rebuilding")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(stamp) as tmp:
        tmp.write_text(yaml.safe_dump(fingerprint))

    todo = [(str(root), str(out), r.img_id, int(r.fold), r.lr_path, r.hr_path, lr_size, lr_stride,
             cfg.data.scale, cfg.patch.edge)
            for r in splits.itertuples() if not (out / "done" / f"{r.img_id}.csv").is_file()]
    skipped = len(splits) - len(todo)
    if todo:
        if cfg.patch.workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(cfg.patch.workers) as pool:
                list(tqdm(pool.map(_patch_image, todo), total=len(todo), desc="patchify", unit="img"))
        else:
            for job in tqdm(todo, desc="patchify", unit="img"):
                _patch_image(job)

    manifest = pd.concat([pd.read_csv(out / "done" / f"{i}.csv", dtype={"img_id": str, "patch_id": str})
                          for i in splits["img_id"]], ignore_index=True)
    with atomic_write(out / "manifest.csv") as tmp:
        manifest.to_csv(tmp, index=False)
    save_config(cfg, out / "config.yaml", sections=("data", "patch"))
    per_fold = manifest.groupby("fold").size().to_dict()
    print(f"{len(manifest)} patch pairs (LR {lr_size} / HR {lr_size * cfg.data.scale}, stride "
          f"{lr_stride * cfg.data.scale} HR) from {len(splits)} images ({skipped} already done); "
          f"per fold: {per_fold}; manifest: {out / 'manifest.csv'}")
