"""``patchify``: cut every training pair into aligned LR/HR patches (the patchify package).

Geometry: ``patchify.size`` and ``patchify.stride`` are HR pixels and must divide by the scale; the
LR grid uses size/scale and stride/scale, so LR patch (y, x) covers exactly HR (scale*y, scale*x).
The default 512/512 on 2048^2 HR gives the reference team's 16 patches per image.

Edges that do not divide (``patchify.edge``): ``shift`` adds a last row/column of patches flush with
the bottom/right edge (overlapping its neighbour), so every pixel is used; ``drop`` leaves the
remainder out, as patchify itself does.

Output in ``<data>/patches/`` (``pipeline.core.layout.PatchLayout``): ``lr/<patch_id>.png``,
``hr/<patch_id>.png``, ``manifest.csv`` (patch_id, img_id, fold, y, x, lr_path, hr_path; y, x =
LR top-left), ``config.yaml``, ``fingerprint.yaml``. Idempotent: each finished image leaves
``done/<img_id>.json`` with the size and modification time of its two source files; a re-run skips
an image only if those are unchanged (a corrected image is cut again), and a change of geometry or
of splits.csv rebuilds everything. A ``patches/`` folder without ``fingerprint.yaml`` was not made
here: it is refused, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from patchify import patchify
from tqdm import tqdm

from pipeline.core.config import Config, PatchifyConfig, save_config, to_dict
from pipeline.core.errors import DataError, UserError
from pipeline.core.files import atomic_write, clean_stale
from pipeline.core.images import encode_png, read_uint8
from pipeline.core.layout import MANIFEST_COLUMNS, DataLayout, PatchLayout
from pipeline.core.locks import data_lock
from pipeline.core.workers import process_pool
from pipeline.core.yaml_bounded import load_yaml


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


def source_signature(lr: Path, hr: Path) -> list[int]:
    """What a finished image's patches depend on besides the settings: its files' sizes and mtimes."""
    out = []
    for path in (lr, hr):
        st = path.stat()
        out += [st.st_size, st.st_mtime_ns]
    return out


def _patch_image(job: tuple) -> list[tuple]:
    """Cut one LR/HR pair, write its PNGs, return its manifest rows (run in a worker)."""
    root, out, img_id, fold, lr_rel, hr_rel, lr_size, lr_stride, scale, edge = job
    patches = PatchLayout(Path(out))
    lr_path, hr_path = Path(root) / lr_rel, Path(root) / hr_rel
    signature = source_signature(lr_path, hr_path)  # before reading: a change while cutting shows next time
    lr = read_uint8(lr_path)
    hr = read_uint8(hr_path)
    if hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
        raise UserError(f"{hr_path}: HR {hr.shape[1]}x{hr.shape[0]} is not {scale}x LR "
                        f"{lr.shape[1]}x{lr.shape[0]} (run prepare first)")
    if lr_size > min(lr.shape[:2]):
        raise UserError(f"{lr_path}: LR {lr.shape[1]}x{lr.shape[0]} is smaller than the "
                        f"patch ({lr_size}); lower patchify.size")
    lr_patches = _cut(lr, lr_size, lr_stride, edge)
    hr_patches = _cut(hr, lr_size * scale, lr_stride * scale, edge)
    rows = []
    for (y, x), lr_patch in sorted(lr_patches.items()):
        patch_id = patches.patch_id(img_id, y, x)
        hr_patch = hr_patches[(y * scale, x * scale)]
        for kind, patch in (("lr", lr_patch), ("hr", hr_patch)):
            rel = patches.relative(kind, patch_id)
            with atomic_write(patches.dir / rel) as tmp:
                tmp.write_bytes(encode_png(np.ascontiguousarray(patch)))
        rows.append((patch_id, img_id, fold, y, x, patches.relative("lr", patch_id), patches.relative("hr", patch_id)))
    with atomic_write(patches.done(img_id)) as tmp:
        tmp.write_text(json.dumps({"source": signature, "rows": rows}))
    return rows


def _finished(patches: PatchLayout, img_id: str, lr: Path, hr: Path) -> list[list] | None:
    """The manifest rows of an image cut earlier from the same files, else None (cut it again)."""
    done = patches.done(img_id)
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text())
        same = record["source"] == source_signature(lr, hr)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record["rows"] if same else None


def _fingerprint(cfg: Config, splits_path: Path) -> dict:
    """What all patches depend on: geometry and the exact splits file."""
    return {"patchify": {k: v for k, v in to_dict(cfg.patchify).items() if k != "workers"},
            "scale": cfg.data.scale,
            "splits_sha256": hashlib.sha256(splits_path.read_bytes()).hexdigest()}


def check_geometry(opts: PatchifyConfig, scale: int) -> tuple[int, int]:
    """(LR size, LR stride) from the HR settings, or a UserError naming the bad setting."""
    stride = opts.stride or opts.size
    for key, value in (("patchify.size", opts.size), ("patchify.stride", stride)):
        if value <= 0 or value % scale:
            raise UserError(f"{key}={value} must be a positive multiple of the scale ({scale}) at HR scale")
    if stride > opts.size:
        raise UserError(f"patchify.stride={stride} is larger than patchify.size={opts.size}: pixels would be skipped")
    return opts.size // scale, stride // scale


def _recorded(patches: PatchLayout) -> Any:
    """The fingerprint the folder records (read with bounded aliases), or None when it cannot be read."""
    try:
        return load_yaml(patches.fingerprint.read_text())
    except (yaml.YAMLError, UserError, UnicodeDecodeError):
        return None  # a damaged record: the folder is rebuilt, as for other settings


def _open_folder(patches: PatchLayout, fingerprint: dict) -> None:
    """Make ``patches/`` ready: ours with other settings is rebuilt, someone else's is refused."""
    out = patches.dir
    if out.exists():
        if not patches.fingerprint.is_file():
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            else:
                raise DataError(f"{out}: exists but was not made by patchify (no {patches.fingerprint.name}); "
                                "move it away, patchify will not delete it")
        elif _recorded(patches) != fingerprint:
            print(f"{out}: settings or splits changed; rebuilding")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(patches.fingerprint) as tmp:
        tmp.write_text(yaml.safe_dump(fingerprint))
    for sub in ("lr", "hr", "done"):
        clean_stale(out / sub)  # temporary files of a killed earlier run
    clean_stale(out)


def main(cfg: Config) -> None:
    data = DataLayout(Path(cfg.data.dir))
    with data_lock(data.root, "patchify"):  # one patches/ folder, cut by one process at a time
        _patchify(cfg, data)


def _patchify(cfg: Config, data: DataLayout) -> None:
    lr_size, lr_stride = check_geometry(cfg.patchify, cfg.data.scale)
    splits = data.splits()
    patches = data.patches
    _open_folder(patches, _fingerprint(cfg, data.splits_csv))

    rows: dict[str, list] = {}
    todo = []
    for r in splits.itertuples():
        lr, hr = data.root / r.lr_path, data.root / r.hr_path
        for path in (lr, hr):
            if not path.is_file():
                raise DataError(f"{path}: listed in {data.splits_csv} but the file does not exist")
        done = _finished(patches, r.img_id, lr, hr)
        if done is not None:
            rows[r.img_id] = done
        else:
            todo.append((str(data.root), str(patches.dir), r.img_id, int(r.fold), r.lr_path, r.hr_path, lr_size,
                         lr_stride, cfg.data.scale, cfg.patchify.edge))
    skipped = len(splits) - len(todo)
    if todo:
        if cfg.patchify.workers > 1 and len(todo) > 1:
            with process_pool(cfg.patchify.workers) as pool:
                results = list(tqdm(pool.map(_patch_image, todo), total=len(todo), desc="patchify", unit="img"))
        else:
            results = [_patch_image(job) for job in tqdm(todo, desc="patchify", unit="img")]
        rows.update({job[2]: result for job, result in zip(todo, results)})

    import pandas as pd  # here: the settings and the dataset's folder and splits are checked before it loads

    manifest = pd.DataFrame([row for i in splits["img_id"] for row in rows[i]], columns=list(MANIFEST_COLUMNS))
    with atomic_write(patches.manifest) as tmp:
        manifest.to_csv(tmp, index=False)
    save_config(cfg, patches.config, sections=("data", "patchify"))
    per_fold = manifest.groupby("fold").size().to_dict()
    print(f"{len(manifest)} patch pairs (LR {lr_size} / HR {lr_size * cfg.data.scale}, stride "
          f"{lr_stride * cfg.data.scale} HR) from {len(splits)} images ({skipped} already done); "
          f"per fold: {per_fold}; manifest: {patches.manifest}")
