"""``ablate``: every inference setting on the validation fold -> ``ablation.csv`` + ``ablation.png``.

A grid over ensemble ways (``ablate.tta``), tile/stride pairs (``ablate.tiles``, ``"0"`` = whole
image) and window sets (``ablate.windows``, ``"0+64/32"`` = ``infer.windows=[0, 64/32]``), tile blends,
precisions, merge rules (``ablate.merges``) and model sets (the run alone, then the run averaged
with each entry of ``ablate.runs``; ``"b+c"`` averages three). Settings that compute the same thing
are run once: the tile blend of a whole-image pass, a window set of one window and that tile, and a
precision that resolves to one already in the grid (``auto`` is fp32 on a CPU without native bf16).
Each row: PSNR/SSIM (contest protocol) on the validation fold's whole images, seconds per image,
and the gain over the configured default (``infer.*``), which the plot marks with a star: the mean
per-image PSNR difference with its paired bootstrap 95% interval (``gain_lo`` .. ``gain_hi``;
``metrics.paired_gain``, seed ``seed``), drawn as error bars.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from pipeline.core.config import Config, save_config, with_overrides
from pipeline.core.files import atomic_write
from pipeline.core.images import read_float, read_uint8, to_uint8
from pipeline.core.layout import DataLayout, OutputLayout
from pipeline.core.metrics import paired_gain, score_pair

if TYPE_CHECKING:  # torch, pandas and the inference package load in the functions that compute
    import pandas as pd
    import torch
    from torch import nn

    from pipeline.inference.predict import Settings

COLUMNS = ["models", "tta", "tile", "stride", "windows", "tile_blend", "precision", "merge", "psnr", "ssim",
           "sec_per_image", "gain_db", "gain_lo", "gain_hi", "default"]


def parse_tile(spec: str) -> tuple[int | str, int]:
    """``"128/64"`` -> (128, 64); ``"0"`` -> whole image (0, 0); ``"auto"`` -> ("auto", 0)."""
    from pipeline.inference.windows import parse_window

    window = parse_window(spec, "ablate.tiles")
    return window.tile, window.stride


def parse_window_set(entry: str) -> tuple[str, ...]:
    """``"0+64/32"`` -> ("0", "64/32"): an ``infer.windows`` value, each window checked."""
    from pipeline.inference.windows import parse_window

    return tuple(parse_window(w, f"ablate.windows entry {entry!r}").spec for w in str(entry).split("+"))


def _windows_key(s: Settings) -> tuple:
    """What the windows of ``s`` compute: their (tile, stride) pairs and normalised weights."""
    from pipeline.inference.windows import normalised

    cuts = tuple((0, 0) if w.whole else (w.tile, w.stride) for w in s.window_list())
    weights = s.weights()
    return cuts, tuple(normalised(weights)) if len(cuts) > 1 else ()


def settings_grid(cfg: Config, models: Sequence[nn.Module], device: torch.device) -> list[Settings]:
    """The distinct settings to run for ``models`` on ``device``, the configured default first (two
    precisions that resolve to one dtype for these models run once)."""
    from pipeline.core.runtime import precision_name
    from pipeline.inference.predict import Settings, inference_dtype

    base = Settings.from_config(cfg.infer)
    grid = [base]
    tilings = [{"tile": t, "stride": s or base.stride, "windows": (), "window_weights": ()}
            for t, s in map(parse_tile, cfg.ablate.tiles)]
    tilings += [{"windows": parse_window_set(entry), "window_weights": ()} for entry in cfg.ablate.windows]
    for tta, tiling, tile_blend, precision, merge in itertools.product(
            cfg.ablate.tta, tilings, cfg.ablate.tile_blends, cfg.ablate.precisions, cfg.ablate.merges):
        grid.append(dataclasses.replace(base, tta=tta, tile_blend=tile_blend, precision=precision, merge=merge,
                                        **tiling))

    def key(s: Settings) -> tuple:
        dtype = inference_dtype(models, device, s.precision)
        windows = _windows_key(s)
        tile_blend = "-" if all(tile == 0 for tile, _ in windows[0]) else s.tile_blend
        return (s.tta, windows, tile_blend, precision_name(dtype), s.merge)

    seen, out = set(), []
    for s in grid:
        if key(s) not in seen:
            seen.add(key(s))
            out.append(s)
    return out


def model_sets(cfg: Config) -> list[tuple[str, Config]]:
    """(label, config) per model set: the run alone, then the run + each ``ablate.runs`` entry."""
    sets = [(cfg.run if cfg.model.name != "bicubic" else "bicubic", cfg)]
    for entry in cfg.ablate.runs:
        extra = tuple(r for r in entry.split("+") if r)
        sets.append((f"{cfg.run}+{entry}", with_overrides(cfg, **{"infer.runs": extra})))
    return sets


def run_grid(cfg: Config) -> pd.DataFrame:
    """Score every (model set, setting) on the validation fold; one row each."""
    pairs = DataLayout(Path(cfg.data.dir)).validation_pairs(cfg.data.val_fold)  # before torch loads
    import pandas as pd

    from pipeline.core.runtime import pick_device
    from pipeline.inference.predict import Settings, load_models, predict_images
    from pipeline.inference.windows import AUTO

    lr_images = [read_float(p.lr_path) for p in pairs]
    hr_images = [read_uint8(p.hr_path) for p in pairs]
    names = [p.name for p in pairs]
    device = pick_device()
    rows, jobs, per_image = [], [], []
    sets = model_sets(cfg)
    for label, set_cfg in sets:
        models, _desc = load_models(set_cfg)
        # Untimed warm-up (lazy allocations, oneDNN kernel selection) so row 1 is not penalised.
        predict_images(models, lr_images[:1], Settings.from_config(cfg.infer), device)
        for settings in settings_grid(cfg, models, device):
            jobs.append((label, models, settings))
    default = Settings.from_config(cfg.infer)
    for label, models, settings in tqdm(jobs, desc="ablate", unit="setting"):
        srs, timing = predict_images(models, lr_images, settings, device, names)
        scores = [score_pair(to_uint8(sr), hr) for sr, hr in zip(srs, hr_images)]
        per_image.append(np.array([s["psnr"] for s in scores]))
        tile = 0 if settings.windows else settings.tile
        whole = all(w.whole for w in settings.window_list())
        rows.append({
            "models": label, "tta": settings.tta, "tile": tile,
            "stride": settings.stride if tile and tile != AUTO else 0,
            "windows": settings.window_text() or "-", "tile_blend": "-" if whole else settings.tile_blend,
            "precision": timing.precision, "merge": settings.merge,
            "psnr": float(np.mean([s["psnr"] for s in scores])), "ssim": float(np.mean([s["ssim"] for s in scores])),
            "sec_per_image": timing.seconds / max(timing.images, 1),
            "default": label == sets[0][0] and settings == default,
        })
    table = pd.DataFrame(rows)
    ref = np.flatnonzero(table["default"].to_numpy())
    gains = [paired_gain(p, per_image[ref[0]], seed=cfg.seed) if len(ref) else (np.nan,) * 3 for p in per_image]
    table[["gain_db", "gain_lo", "gain_hi"]] = np.array(gains, dtype=np.float64).reshape(-1, 3)  # one row per setting
    return table[COLUMNS]


def plot(table: pd.DataFrame, path: Path, title: str) -> None:
    """PSNR against seconds per image, one point per setting, the default starred; the error bars are the 95%
    interval of each setting's gain over the default, placed on its PSNR (the default's has zero width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for tta, group in table.groupby("tta"):
        points = ax.scatter(group["sec_per_image"], group["psnr"], s=36, label=f"{tta}-way ensemble", alpha=0.85)
        below = (group["gain_db"] - group["gain_lo"]).clip(lower=0)
        above = (group["gain_hi"] - group["gain_db"]).clip(lower=0)
        ax.errorbar(group["sec_per_image"], group["psnr"], yerr=[below, above], fmt="none", capsize=2.5,
                    elinewidth=0.9, ecolor=points.get_facecolor()[0], alpha=0.85)
    for row in table.itertuples():
        if row.windows != "-":
            tiles = f"windows {row.windows} {row.tile_blend}"
        else:
            tiles = "whole" if row.tile == 0 else f"{row.tile}/{row.stride} {row.tile_blend}"
        merge = "" if row.merge == "mean" else f" {row.merge}"
        ax.annotate(f"{tiles} {row.precision}{merge}", (row.sec_per_image, row.psnr), fontsize=6.5,
                    xytext=(3, 2), textcoords="offset points")
    chosen = table[table["default"]]
    ax.scatter(chosen["sec_per_image"], chosen["psnr"], marker="*", s=260, facecolors="none",
               edgecolors="black", linewidths=1.3, label="default (infer.*)")
    ax.set_xlabel("seconds per image")
    ax.set_ylabel("PSNR (dB, validation fold, RGB)")
    ax.set_title(f"{title}\nbars: 95% interval of the gain over the default (paired bootstrap over images)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(cfg: Config) -> None:
    out = OutputLayout(Path(cfg.paths.submit), cfg.run)
    table = run_grid(cfg)
    with atomic_write(out.ablation_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    plot(table, out.ablation_png, f"run {cfg.run}: inference settings on fold {cfg.data.val_fold}")
    save_config(cfg, out.ablate_config, sections=("data", "model", "infer", "ablate", "paths"))
    shown = table.sort_values("psnr", ascending=False)
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"ablation: {out.ablation_csv}  plot: {out.ablation_png}")
