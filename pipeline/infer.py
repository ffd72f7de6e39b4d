"""``infer``: super-resolve the test set, the validation fold, or any folder, and write PNGs.

What runs: ``model.name=bicubic`` (no checkpoint; always the whole image, one way, fp32, so it
is exactly MATLAB's bicubic); else ``model.pretrained`` bare weights when the run has no
checkpoint; else the run's ``infer.checkpoint`` (EMA weights first), or its last
``infer.last_k`` history checkpoints, plus the ``infer.runs`` extra runs, averaged at the output; or,
with ``blend.name=NAME``, the members of ``submit/NAME/blend.yaml`` (written by the blend stage)
weighted by its weights, the outputs going to ``submit/NAME/`` as a run's go to ``submit/<run>/``.

Which images (outputs named ``<img_id>.png``):
- default: the dataset's test set (``test.csv``, else ``test/lr``) -> ``submit/<run>/pred``
- ``infer.split=val``: the validation fold of ``splits.csv`` -> ``submit/<run>/val_pred``, then
  scored against HR (competition protocol) and appended to ``submit/leaderboard.csv`` with the gain
  over bicubic on the same images and its paired bootstrap 95% interval; the row's per-image scores
  go to ``submit/leaderboard/<time>-<run>.csv`` (``scores`` column), so any two rows can be compared
- ``--input DIR --output DIR``: every image in DIR, named by file stem.
Beside the PNGs: ``timing.json`` (seconds per image, tiles per second, peak memory, device,
precision, torch.compile mode and seconds, images rerun in fp32; per window of ``infer.windows``
or ``tile=auto``: seconds, tile forwards and the tiles it ran) and ``config.yaml`` (the resolved config).

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
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from pipeline.core.config import Config, save_config
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write, staged_dir
from pipeline.core.images import PngWriter, images_by_stem, read_ahead, read_uint8, to_uint8
from pipeline.core.layout import COMPLETE_MARK, LEADERBOARD_COLUMNS, DataLayout, OutputLayout, output_name
from pipeline.core.locks import file_lock
from pipeline.core.metrics import gain_text, paired_gain, score_pair

if TYPE_CHECKING:  # torch, pandas and the inference package load in the functions that compute (_work first)
    import pandas as pd
    import torch

    from pipeline.core.distributed import Dist
    from pipeline.inference.predict import Settings

LEADERBOARD_WAIT = 60.0  # seconds another infer may hold leaderboard.csv (it rewrites a small CSV)


def settings_for(cfg: Config) -> Settings:
    from pipeline.inference.predict import Settings
    from pipeline.inference.reference import exact_bicubic

    settings = Settings.from_config(cfg.infer)
    if cfg.model.name == "bicubic" and not cfg.blend.name:
        settings = exact_bicubic(settings)
    return settings


def append_leaderboard(path: Path, row: dict) -> None:
    """Add one row to the leaderboard CSV (rewritten atomically); older files gain the new columns, empty.
    Every run's infer appends to the one file: the read and the rewrite hold its lock, so two runs
    finishing together both keep their row."""
    import pandas as pd

    with file_lock(path, "infer", wait=LEADERBOARD_WAIT):
        table = pd.DataFrame([row], columns=list(LEADERBOARD_COLUMNS))
        if path.is_file():
            table = pd.concat([pd.read_csv(path), table], ignore_index=True)
            extra = [c for c in table.columns if c not in LEADERBOARD_COLUMNS]
            table = table[[*LEADERBOARD_COLUMNS, *extra]]
        with atomic_write(path) as tmp:
            table.to_csv(tmp, index=False)


def with_reference(cfg: Config, row: dict[str, Any], scores: pd.DataFrame, items: list[tuple[str, Path]],
                   hr_paths: dict[str, Path], device: torch.device, settings: Settings) -> dict[str, Any]:
    """The row with its gain over bicubic on the same images (paired bootstrap 95% interval), after its
    per-image scores (and bicubic's) are written to ``submit/leaderboard/<time>-<name>.csv``."""
    from pipeline.inference.reference import bicubic_psnr

    out = OutputLayout(Path(cfg.paths.submit), output_name(cfg))
    reference = bicubic_psnr(items, hr_paths, out, device, settings)
    per_image = scores[["img_id", "psnr", "ssim"]].assign(bicubic_psnr=scores["img_id"].map(reference).to_numpy())
    gain = paired_gain(per_image["psnr"], per_image["bicubic_psnr"], seed=cfg.seed)
    stamp = row["timestamp"].replace("-", "").replace(":", "")
    row_id, n = f"{stamp}-{out.run}", 1
    while out.leaderboard_scores(row_id).exists():
        n += 1
        row_id = f"{stamp}-{out.run}-{n}"
    path = out.leaderboard_scores(row_id)
    with atomic_write(path) as tmp:
        per_image.to_csv(tmp, index=False, float_format="%.6f")
    return {**row, "gain_db": round(gain[0], 4), "gain_lo": round(gain[1], 4), "gain_hi": round(gain[2], 4),
            "scores": path.relative_to(out.submit_root).as_posix()}


def _work(cfg: Config) -> tuple[list[tuple[str, Path]], dict[str, Path], Path]:
    """(name, LR path) of every image, HR paths of the validation fold, and the output folder."""
    out = OutputLayout(Path(cfg.paths.submit), output_name(cfg))
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
    if "windows" in merged:  # per window, as above: forwards add up, seconds are the slowest rank's
        merged["windows"] = [{**w, "tile_forwards": sum(p["windows"][i]["tile_forwards"] for p in parts),
                              "seconds_total": max(p["windows"][i]["seconds_total"] for p in parts),
                              "tiles": sorted({t for p in parts for t in p["windows"][i]["tiles"]})}
                             for i, w in enumerate(merged["windows"])]
    seconds = merged["seconds_total"]
    merged["seconds_per_image"] = round(seconds / max(merged["images"], 1), 4)
    merged["tiles_per_second"] = round(merged["tile_forwards"] / seconds, 3) if seconds else 0.0
    merged["device"] = ",".join(dict.fromkeys(p["device"] for p in parts))
    merged["ranks"] = len(parts)
    return merged


def _predict(cfg: Config, d: Dist, items: list[tuple[str, Path]], hr_paths: dict[str, Path], stage: Path,
             settings: Settings) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """This rank's share of the images into ``stage``; its timing summary, scores and model description."""
    from pipeline.core.runtime import peak_memory
    from pipeline.inference.blend import blend_predictions
    from pipeline.inference.predict import Timing, iter_predict, load_models

    mine = items[d.rank::d.world]
    timing = Timing(device=str(d.device), precision="")
    scores = []
    lr_stream = read_ahead(mine)  # decoded in a thread while the device works
    if cfg.blend.name:  # the members of submit/<name>/blend.yaml, weighted
        predictions, model_desc = blend_predictions(cfg, settings, d.device, timing, lr_stream, len(mine))
    else:
        models, model_desc = load_models(cfg)
        predictions = iter_predict(models, lr_stream, settings, d.device, timing, len(mine))
    with PngWriter() as writer, peak_memory(d.device) as mem:
        for name, sr in tqdm(predictions, total=len(mine), desc=f"infer {model_desc}", unit="img",
                             disable=not d.main):
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
    items, hr_paths, out_dir = _work(cfg)  # the folders, before torch loads
    from pipeline.core.distributed import barrier, init_distributed, shutdown
    from pipeline.inference.predict import check_settings

    settings = settings_for(cfg)
    check_settings(settings)  # before any folder or model is touched
    d = init_distributed()
    try:
        if d.main:
            with staged_dir(out_dir, COMPLETE_MARK) as stage:
                result = _run(cfg, d, items, hr_paths, out_dir, stage, settings)
            if result is not None:  # the scores join the leaderboard once their predictions are in place
                row = with_reference(cfg, *result, items, hr_paths, d.device, settings)
                board = OutputLayout(Path(cfg.paths.submit), output_name(cfg)).leaderboard
                append_leaderboard(board, row)
                gain = gain_text((row["gain_db"], row["gain_lo"], row["gain_hi"]), row["images"])
                print(f"validation fold {cfg.data.val_fold}: PSNR {row['psnr']:.4f} SSIM {row['ssim']:.4f}, "
                      f"gain over bicubic {gain} -> {board}")
        else:
            _run(cfg, d, items, hr_paths, out_dir, None, settings)
        barrier(d)  # every rank returns after rank 0 swapped the folder in
    finally:
        shutdown(d)


def _run(cfg: Config, d: Dist, items: list[tuple[str, Path]], hr_paths: dict[str, Path], out_dir: Path,
         stage: Path | None, settings: Settings) -> tuple[dict[str, Any], pd.DataFrame] | None:
    """Predict into ``stage``; on rank 0 write its timing and config and return the leaderboard row and
    the per-image scores (None without scores, and on the other ranks)."""
    from pipeline.core.distributed import broadcast, gather

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
    if summary.get("windows"):
        per = [f"{w['window']}{' (' + '+'.join(w['tiles']) + ')' if w['window'] == 'auto' else ''} "
               f"{w['seconds_total'] / max(summary['images'], 1):.3f}" for w in summary["windows"]]
        print(f"seconds per image by window: {', '.join(per)}")
        for why in sorted({why for w in summary["windows"] for why in w.get("auto", [])}):
            print(f"auto: {why}")
    if summary["fp32_fallbacks"]:
        print(f"rerun in fp32 after NaN/Inf: {', '.join(summary['fp32_fallbacks'])}")
    if not scores:
        return None
    import pandas as pd

    df = pd.DataFrame(scores)
    resolved = dataclasses.replace(settings, precision=summary["precision"])  # 'auto' -> what ran
    row = {"timestamp": dt.datetime.now().isoformat(timespec="seconds"), "run": output_name(cfg),
           "model": model_desc, "settings": resolved.label(), "images": len(df),
           "psnr": round(float(df["psnr"].mean()), 4), "ssim": round(float(df["ssim"].mean()), 4),
           "sec_per_image": summary["seconds_per_image"], "device": summary["device"]}
    return row, df
