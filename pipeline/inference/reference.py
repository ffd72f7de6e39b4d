"""The reference every leaderboard row is compared with: bicubic's per-image PSNR on the same images.

Computed once per set of images and kept in ``submit/leaderboard/bicubic-<key>.csv``, the key a hash
of the image ids, their LR and HR paths, sizes and modification times (a changed file is a new key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from pipeline.core.files import atomic_write
from pipeline.core.images import read_ahead, read_uint8, to_uint8
from pipeline.core.layout import OutputLayout
from pipeline.core.metrics import score_psnr
from pipeline.inference.predict import Settings, Timing, iter_predict
from pipeline.models.table import build_model


def exact_bicubic(settings: Settings) -> Settings:
    """``settings`` for bicubic: the whole image, one way, fp32, so it is exactly MATLAB's bicubic
    (no tile seams, no ensemble rounding)."""
    return dataclasses.replace(settings, tile=0, tta=1, precision="fp32", windows=(), window_weights=())


def _key(items: Sequence[tuple[str, Path]], hr_paths: dict[str, Path]) -> str:
    def sign(path: Path) -> list[object]:
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]

    text = json.dumps([[name, sign(Path(lr)), sign(Path(hr_paths[name]))] for name, lr in sorted(items)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def bicubic_psnr(items: Sequence[tuple[str, Path]], hr_paths: dict[str, Path], out: OutputLayout,
                 device: torch.device, settings: Settings) -> pd.Series:
    """img_id -> bicubic's contest PSNR for every (img_id, LR path) of ``items``, from the cache when
    it holds exactly these images, else computed (and cached)."""
    cache = out.leaderboard_scores(f"bicubic-{_key(items, hr_paths)}")
    names = sorted(name for name, _lr in items)
    if cache.is_file():
        table = pd.read_csv(cache, dtype={"img_id": str})
        if sorted(table["img_id"]) == names and table["psnr"].notna().all():
            return table.set_index("img_id")["psnr"]
    timing = Timing(device=str(device), precision="")
    rows = []
    stream = iter_predict([build_model("bicubic")], read_ahead(list(items)), exact_bicubic(settings), device, timing,
                          len(items))
    for name, sr in stream:
        rows.append({"img_id": name, "psnr": score_psnr(to_uint8(sr), read_uint8(hr_paths[name]))})
    table = pd.DataFrame(rows, columns=["img_id", "psnr"])
    with atomic_write(cache) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    return table.set_index("img_id")["psnr"]
