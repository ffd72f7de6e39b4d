"""``infer``: super-resolve the test set, the validation fold, or any folder, and write PNGs.

What runs: ``model.name=bicubic`` (no checkpoint; always the whole image, one way, fp32, so it
is exactly MATLAB's bicubic); else ``model.pretrained`` bare weights when the run has no
checkpoint; else the run's ``infer.checkpoint`` (EMA weights first), or its last
``infer.last_k`` history checkpoints, plus the ``infer.runs`` extra runs, averaged at the output.

Which images (outputs named ``<img_id>.png``):
- default: the dataset's test set (``test.csv``, else ``test/lr``) -> ``submit/<run>/pred``
- ``infer.split=val``: the validation fold of ``splits.csv`` -> ``submit/<run>/val_pred``, then
  scored against HR (competition protocol) and appended to ``submit/leaderboard.csv``
- ``--input DIR --output DIR``: every image in DIR, named by file stem.
Beside the PNGs: ``timing.json`` (seconds per image, tiles per second, peak memory, device,
precision, torch.compile mode and seconds, images rerun in fp32) and ``config.yaml`` (the resolved config).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.config import Config, save_config
from pipeline.dataset import validation_images
from pipeline.errors import UserError
from pipeline.evaluate import score_pair
from pipeline.images import PngWriter, atomic_write, images_by_stem, read_ahead, read_uint8, to_uint8
from pipeline.predict import Settings, Timing, iter_predict, load_models, validate
from pipeline.runtime import peak_memory, pick_device

LEADERBOARD_COLUMNS = ["timestamp", "run", "model", "settings", "images", "psnr", "ssim", "sec_per_image", "device"]


def test_items(root: Path) -> list[tuple[str, Path]]:
    """(img_id, LR path) of the dataset's test set."""
    from pipeline.prepare import read_test_table

    if not root.is_dir():
        raise UserError(f"{root}: data folder not found (--data)")
    table = read_test_table(root)
    if table.empty:
        raise UserError(f"{root}: no test set (neither test.csv nor test/lr)")
    return [(str(i), root / p) for i, p in zip(table["img_id"], table["lr_path"])]


def val_items(root: Path, fold: int) -> list[tuple[str, Path, Path]]:
    """(img_id, LR path, HR path) of the validation fold in ``splits.csv`` (the trainer's own list)."""
    return [(p.name, p.lr_path, p.hr_path) for p in validation_images(root, fold)]


def settings_for(cfg: Config) -> Settings:
    settings = Settings.from_config(cfg.infer)
    if cfg.model.name == "bicubic":  # exact MATLAB bicubic: no tile seams, no ensemble rounding
        settings = dataclasses.replace(settings, tile=0, tta=1, precision="fp32")
    return settings


def append_leaderboard(path: Path, row: dict) -> None:
    """Add one row to the leaderboard CSV (rewritten atomically)."""
    table = pd.DataFrame([row], columns=LEADERBOARD_COLUMNS)
    if path.is_file():
        table = pd.concat([pd.read_csv(path), table], ignore_index=True)
    with atomic_write(path) as tmp:
        table.to_csv(tmp, index=False)


def main(cfg: Config) -> None:
    root = Path(cfg.data.dir)
    run_dir = Path(cfg.paths.submit) / cfg.run
    hr_paths: dict[str, Path] = {}
    if cfg.infer.input:
        if not cfg.infer.output:
            raise UserError("--input needs --output (the folder the SR PNGs go to)")
        items = list(images_by_stem(cfg.infer.input, "input").items())
    elif cfg.infer.split == "val":
        triples = val_items(root, cfg.data.val_fold)
        items = [(i, lr) for i, lr, _hr in triples]
        hr_paths = {i: hr for i, _lr, hr in triples}
    else:
        items = test_items(root)
    default_out = run_dir / ("val_pred" if cfg.infer.split == "val" and not cfg.infer.input else "pred")
    out_dir = Path(cfg.infer.output) if cfg.infer.output else default_out

    settings = settings_for(cfg)
    validate(settings)  # before any folder or model is touched
    models, model_desc = load_models(cfg)
    device = pick_device()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    timing = Timing(device=str(device), precision="")
    scores = []
    lr_stream = read_ahead(items)  # decoded in a thread while the device works
    with PngWriter() as writer, peak_memory(device) as mem:
        for name, sr in tqdm(iter_predict(models, lr_stream, settings, device, timing, len(items)),
                             total=len(items), desc=f"infer {model_desc}", unit="img"):
            writer.write(out_dir / f"{name}.png", sr)  # rounded once (to_uint8), encoded, written in a thread
            if name in hr_paths:
                sr8 = to_uint8(sr)  # the same rounding as the written PNG
                hr = read_uint8(hr_paths[name])
                if hr.shape != sr8.shape:
                    raise UserError(f"{hr_paths[name]}: HR is {hr.shape[1]}x{hr.shape[0]}, the prediction "
                                    f"{sr8.shape[1]}x{sr8.shape[0]}")
                scores.append({"img_id": name, **score_pair(sr8, hr, "competition", cfg.data.scale)})
    timing.peak_mib = mem["peak_mib"]
    summary = {**timing.summary(), "model": model_desc, "settings": dataclasses.asdict(settings)}
    with atomic_write(out_dir / "timing.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print(f"{len(items)} image(s) -> {out_dir}  ({summary['seconds_per_image']:.3f} s/image, "
          f"{summary['tiles_per_second']:.1f} tiles/s, {summary['precision']} on {summary['device']}, "
          f"peak {summary['peak_memory_mib']:.0f} MiB)")
    if timing.compile != "off":
        print(f"torch.compile ({timing.compile}): {timing.compile_seconds:.1f} s to compile + warm up, not in s/image")
    if timing.fp32_fallbacks:
        print(f"rerun in fp32 after NaN/Inf: {', '.join(timing.fp32_fallbacks)}")
    if scores:
        df = pd.DataFrame(scores)
        resolved = dataclasses.replace(settings, precision=timing.precision)  # 'auto' -> what ran
        row = {"timestamp": dt.datetime.now().isoformat(timespec="seconds"), "run": cfg.run, "model": model_desc,
               "settings": resolved.label(), "images": len(df), "psnr": round(float(df["psnr"].mean()), 4),
               "ssim": round(float(df["ssim"].mean()), 4), "sec_per_image": summary["seconds_per_image"],
               "device": summary["device"]}
        board = Path(cfg.paths.submit) / "leaderboard.csv"
        append_leaderboard(board, row)
        print(f"validation fold {cfg.data.val_fold}: PSNR {row['psnr']:.4f} SSIM {row['ssim']:.4f} -> {board}")
