"""``evaluate``: PSNR, SSIM and NRMSE of predictions against ground truth, per image and the mean.

The protocols (``competition``: RGB uint8 whole image, the contest metric; ``paper``: Y channel,
``data.scale`` border cropped) and NRMSE are defined in ``pipeline.core.metrics``. The mean NRMSE over
images weighs bad images more than the mean PSNR does.
Beside them, on the whole RGB image whatever the protocol (pipeline.models.perceptual.ImageQuality):
``sharpness``, the Laplacian energy of the prediction over the ground truth's (1 = as much fine detail,
below = smoother), and ``lpips`` when ``evaluate.lpips_weights`` names the backbone's torchvision
weights file (otherwise the column says what is missing).

Folders are matched by file stem; a missing, extra or size-mismatched file is an error naming it.
The output ends with a line ``PSNR <mean> SSIM <mean>``; ``--csv`` writes the per-image table.
``--vs B`` (``evaluate.vs``) scores a second folder of predictions of the same images (PSNR, same
protocol) and prints, before that last line, the gain of ``--sr`` over it: the mean per-image PSNR
difference with its paired bootstrap 95% interval (``metrics.paired_gain``; seed ``seed``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import Config
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write
from pipeline.core.images import images_by_stem, read_uint8
from pipeline.core.metrics import gain_text, paired_gain, score_pair, score_psnr, summary_line

if TYPE_CHECKING:  # pandas and torch (ImageQuality) load once the settings and folders are checked
    import pandas as pd

    from pipeline.models.perceptual import ImageQuality

COLUMNS = ["name", "psnr", "ssim", "nrmse", "sharpness", "lpips"]


def match_folders(sr_dir: str | Path, hr_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """(stem, SR path, HR path) for every stem; the two folders must hold exactly the same stems."""
    sr, hr = images_by_stem(sr_dir, "prediction"), images_by_stem(hr_dir, "ground-truth")
    missing = sorted(set(hr) - set(sr))
    extra = sorted(set(sr) - set(hr))
    if missing:
        raise UserError(f"{sr_dir}: no prediction for {hr[missing[0]].name}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise UserError(f"{sr[extra[0]]}: no ground truth with this name in {hr_dir}"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return [(s, sr[s], hr[s]) for s in sorted(sr)]


def evaluate_pairs(pairs: Iterable[tuple[str, Path, Path]], protocol: str = "competition", scale: int = 4,
                   quality: ImageQuality | None = None) -> pd.DataFrame:
    """One row per (name, SR path, HR path): name, psnr, ssim, nrmse, sharpness, lpips."""
    import pandas as pd

    from pipeline.models.perceptual import ImageQuality

    quality = quality or ImageQuality()
    rows = []
    for name, sr_path, hr_path in pairs:
        sr, hr = read_uint8(sr_path), read_uint8(hr_path)
        if sr.shape != hr.shape:
            raise UserError(f"{sr_path}: prediction is {sr.shape[1]}x{sr.shape[0]} but {hr_path} is "
                            f"{hr.shape[1]}x{hr.shape[0]}")
        rows.append({"name": name, **score_pair(sr, hr, protocol, scale), **quality(sr, hr)})
    return pd.DataFrame(rows, columns=COLUMNS)


def evaluate_folders(sr_dir: str | Path, hr_dir: str | Path, protocol: str = "competition", scale: int = 4,
                     quality: ImageQuality | None = None) -> pd.DataFrame:
    """Per-image scores of every prediction in ``sr_dir`` against the same stem in ``hr_dir``."""
    return evaluate_pairs(match_folders(sr_dir, hr_dir), protocol, scale, quality)


def psnr_of_folder(sr_dir: str | Path, hr_dir: str | Path, protocol: str = "competition",
                   scale: int = 4) -> pd.Series:
    """stem -> PSNR of every prediction in ``sr_dir`` (PSNR only: the reference side of ``--vs``)."""
    import pandas as pd

    scores = {}
    for name, sr_path, hr_path in match_folders(sr_dir, hr_dir):
        sr, hr = read_uint8(sr_path), read_uint8(hr_path)
        if sr.shape != hr.shape:
            raise UserError(f"{sr_path}: prediction is {sr.shape[1]}x{sr.shape[0]} but {hr_path} is "
                            f"{hr.shape[1]}x{hr.shape[0]}")
        scores[name] = score_psnr(sr, hr, protocol, scale)
    return pd.Series(scores, name="psnr")


def mean_row(table: pd.DataFrame) -> list[object]:
    """The table's last row: the mean of every numeric column; a text column (a missing metric) keeps its text."""
    import pandas as pd

    return ["mean", *(table[c].mean() if pd.api.types.is_numeric_dtype(table[c]) else table[c].iloc[0]
                      for c in table.columns[1:])]


def main(cfg: Config) -> None:
    ev = cfg.evaluate
    if not ev.sr or not ev.hr:
        raise UserError("evaluate needs --sr DIR (predictions) and --hr DIR (ground truth)")
    pairs = match_folders(ev.sr, ev.hr)
    if ev.vs:
        match_folders(ev.vs, ev.hr)  # every folder is checked before torch loads (ImageQuality) and work starts
    from pipeline.models.perceptual import ImageQuality

    table = evaluate_pairs(pairs, ev.protocol, cfg.data.scale, ImageQuality(ev.lpips_weights, ev.lpips_net))
    other = psnr_of_folder(ev.vs, ev.hr, ev.protocol, cfg.data.scale) if ev.vs else None  # checked before writing
    if ev.csv:
        with atomic_write(ev.csv) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
    shown = table.copy()
    shown.loc[len(shown)] = mean_row(table)
    print(f"protocol: {ev.protocol}" + (f" (Y channel, {cfg.data.scale}-px border cropped)"
                                        if ev.protocol == "paper" else " (RGB uint8)"))
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if ev.csv:
        print(f"per-image scores -> {ev.csv}")
    if other is not None:
        gain = paired_gain(table["psnr"], other[table["name"]].to_numpy(), seed=cfg.seed)
        print(f"gain of {ev.sr} over {ev.vs}: {gain_text(gain, len(table))}, paired bootstrap over {len(table)} "
              f"image(s) (PSNR {table['psnr'].mean():.4f} vs {other.mean():.4f})")
    print(summary_line(table))
