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
precision, torch.compile mode and seconds, images rerun in fp32) and ``config.yaml``
(the resolved config).

The output folder is built as a hidden folder beside its final place and swapped in only when
every image is written (``pipeline.core.files.staged_dir``): a killed run leaves the previous
predictions untouched, and ``submit`` can only ever pack one finished set of one model. An
existing ``--output`` folder that this stage did not write (no ``timing.json``) is refused.

Several processes (``torchrun --nproc_per_node=N -m pipeline infer ...``): rank r takes images
r, r+N, ... of the same sorted list, all ranks write into the same staged folder (one machine,
or a folder every machine shares), and rank 0 merges the timings and scores and swaps the folder
in: the files are exactly those one process writes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from pipeline.core.config import Config, save_config
from pipeline.core.distributed import Dist, barrier, broadcast, gather, init_distributed, shutdown
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write, staged_dir
from pipeline.core.images import PngWriter, images_by_stem, read_ahead, read_uint8, to_uint8
from pipeline.core.layout import COMPLETE_MARK, LEADERBOARD_COLUMNS, DataLayout, OutputLayout
from pipeline.core.locks import file_lock
from pipeline.core.metrics import score_pair
from pipeline.core.runtime import peak_memory
from pipeline.inference.predict import Settings, Timing, check_settings, iter_predict, load_models

LEADERBOARD_WAIT = 60.0  # seconds another infer may hold leaderboard.csv (it rewrites a small CSV)


def settings_for(cfg: Config) -> Settings:
    settings = Settings.from_config(cfg.infer)
    if cfg.model.name == "bicubic":  # exact MATLAB bicubic: no tile seams, no ensemble rounding
        settings = dataclasses.replace(settings, tile=0, tta=1, precision="fp32")
    return settings


def append_leaderboard(path: Path, row: dict) -> None:
    """Add one row to the leaderboard CSV (rewritten atomically). Every run's infer appends to the one
    file: the read and the rewrite hold its lock, so two runs finishing together both keep their row."""
    with file_lock(path, "infer", wait=LEADERBOARD_WAIT):
        table = pd.DataFrame([row], columns=list(LEADERBOARD_COLUMNS))
        if path.is_file():
            table = pd.concat([pd.read_csv(path), table], ignore_index=True)
        with atomic_write(path) as tmp:
            table.to_csv(tmp, index=False)


def _work(cfg: Config) -> tuple[list[tuple[str, Path]], dict[str, Path], Path]:
    """(name, LR path) of every image, HR paths of the validation fold, and the output folder."""
    out = OutputLayout(Path(cfg.paths.submit), cfg.run)
    if cfg.infer.input:
        if not cfg.infer.output:
            raise UserError("--input needs --output (the folder the SR PNGs go to)")
        return list(images_by_stem(cfg.infer.input, "input").items()), {}, Path(cfg.infer.output)
    data = DataLayout(Path(cfg.data.dir))
    if cfg.infer.split == "val":
        pairs = data.validation_pairs(cfg.data.val_fold)
        items = [(p.name, p.lr_path) for p in pairs]
        default = out.val_pred
        hr = {p.name: p.hr_path for p in pairs}
    else:
        items, default, hr = data.test_items(), out.pred, {}
    return items, hr, Path(cfg.infer.output) if cfg.infer.output else default


def merge_timings(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One timing summary for several ranks that ran side by side: counts add up, wall-clock
    figures (seconds, compile time, peak memory) are the slowest rank's, rates are recomputed."""
    if len(parts) == 1:
        return parts[0]
    merged = dict(parts[0])
    for key in ("images", "tile_forwards"):
        merged[key] = sum(p.get(key, 0) for p in parts)
    for key in ("seconds_total", "peak_memory_mib", "compile_seconds"):
        if key in merged:
            merged[key] = max(p.get(key, 0) for p in parts)
    merged["fp32_fallbacks"] = [n for p in parts for n in p.get("fp32_fallbacks", [])]
    seconds = merged["seconds_total"]
    merged["seconds_per_image"] = round(seconds / max(merged["images"], 1), 4)
    merged["tiles_per_second"] = round(merged["tile_forwards"] / seconds, 3) if seconds else 0.0
    merged["device"] = ",".join(dict.fromkeys(p["device"] for p in parts))
    merged["ranks"] = len(parts)
    return merged


def _predict(cfg: Config, d: Dist, items: list[tuple[str, Path]], hr_paths: dict[str, Path], stage: Path,
             settings: Settings) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """This rank's share of the images into ``stage``; its timing summary, scores and model description."""
    models, model_desc = load_models(cfg)
    mine = items[d.rank::d.world]
    timing = Timing(device=str(d.device), precision="")
    scores = []
    lr_stream = read_ahead(mine)  # decoded in a thread while the device works
    with PngWriter() as writer, peak_memory(d.device) as mem:
        for name, sr in tqdm(iter_predict(models, lr_stream, settings, d.device, timing, len(mine)),
                             total=len(mine), desc=f"infer {model_desc}", unit="img", disable=not d.main):
            writer.write(stage / f"{name}.png", sr)  # rounded once (to_uint8), encoded, written in a thread
            if name in hr_paths:
                sr8 = to_uint8(sr)  # the same rounding as the written PNG
                hr = read_uint8(hr_paths[name])
                if hr.shape != sr8.shape:
                    raise UserError(f"{hr_paths[name]}: HR is {hr.shape[1]}x{hr.shape[0]}, the prediction "
                                    f"{sr8.shape[1]}x{sr8.shape[0]}")
                scores.append({"img_id": name, **score_pair(sr8, hr, "competition", cfg.data.scale)})
    timing.peak_mib = mem["peak_mib"]
    return timing.summary(), scores, model_desc


def main(cfg: Config) -> None:
    items, hr_paths, out_dir = _work(cfg)
    settings = settings_for(cfg)
    check_settings(settings)  # before any folder or model is touched
    d = init_distributed()
    try:
        if d.main:
            with staged_dir(out_dir, COMPLETE_MARK) as stage:
                row = _run(cfg, d, items, hr_paths, out_dir, stage, settings)
            if row is not None:  # the scores join the leaderboard once their predictions are in place
                board = OutputLayout(Path(cfg.paths.submit), cfg.run).leaderboard
                append_leaderboard(board, row)
                print(f"validation fold {cfg.data.val_fold}: PSNR {row['psnr']:.4f} SSIM {row['ssim']:.4f} "
                      f"-> {board}")
        else:
            _run(cfg, d, items, hr_paths, out_dir, None, settings)
        barrier(d)  # every rank returns after rank 0 swapped the folder in
    finally:
        shutdown(d)


def _run(cfg: Config, d: Dist, items: list[tuple[str, Path]], hr_paths: dict[str, Path], out_dir: Path,
         stage: Path | None, settings: Settings) -> dict[str, Any] | None:
    """Predict into ``stage``; on rank 0 write its timing and config and return the leaderboard row
    (None without scores, and on the other ranks)."""
    stage = Path(broadcast(d, str(stage)))  # rank 0 made it; every rank writes its images into it
    summary, scores, model_desc = _predict(cfg, d, items, hr_paths, stage, settings)
    parts = gather(d, (summary, scores))
    if not d.main:
        return None
    timing = merge_timings([p[0] for p in parts])
    scores = [s for p in parts for s in p[1]]
    summary = {**timing, "model": model_desc, "settings": dataclasses.asdict(settings)}
    save_config(cfg, stage / "config.yaml")
    with atomic_write(stage / COMPLETE_MARK) as tmp:  # written last: marks the set complete
        tmp.write_text(json.dumps(summary, indent=2))
    ranks = f" on {d.world} processes" if d.world > 1 else ""
    print(f"{len(items)} image(s) -> {out_dir}  ({summary['seconds_per_image']:.3f} s/image, "
          f"{summary['tiles_per_second']:.1f} tiles/s, {summary['precision']} on {summary['device']}{ranks}, "
          f"peak {summary['peak_memory_mib']:.0f} MiB)")
    if summary.get("compile", "off") != "off":
        print(f"torch.compile ({summary['compile']}): {summary['compile_seconds']:.1f} s to compile + warm up, "
              "not in s/image")
    if summary["fp32_fallbacks"]:
        print(f"rerun in fp32 after NaN/Inf: {', '.join(summary['fp32_fallbacks'])}")
    if not scores:
        return None
    df = pd.DataFrame(scores)
    resolved = dataclasses.replace(settings, precision=summary["precision"])  # 'auto' -> what ran
    return {"timestamp": dt.datetime.now().isoformat(timespec="seconds"), "run": cfg.run, "model": model_desc,
            "settings": resolved.label(), "images": len(df), "psnr": round(float(df["psnr"].mean()), 4),
            "ssim": round(float(df["ssim"].mean()), 4), "sec_per_image": summary["seconds_per_image"],
            "device": summary["device"]}
