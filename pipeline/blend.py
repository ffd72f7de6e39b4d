"""``blend``: fit the weights of several models on the validation fold -> ``submit/<name>/blend.yaml``.

Every member (``blend.members``: runs, a run's last K checkpoints, weights files) runs once on each
validation image with the ``infer.*`` settings; while one image's predictions are in memory its
residual Gram and the exact scores of the members and of their equal mean are kept, then the
predictions are dropped (``pipeline.inference.blend``). From those statistics both methods are
fitted on the whole fold (``lstsq``, ``greedy``; ``blend.method`` picks the weights infer applies)
and, to judge them on images they were not fitted on, by cross-fitting: the fold is split into two
halves by ``seed``, weights fitted on one half score the other, and the other way round. The report
gives the cross-fitted blend's gain over the best member and over the equal mean with paired
bootstrap 95% intervals; in-sample figures (fitted and scored on the same images) are labelled so.

Outputs in ``submit/<name>/``: ``blend.yaml`` (members, weights, settings, validation scores; what
``infer blend.name=<name>`` reads), ``blend_scores.csv`` (per image) and ``blend_config.yaml``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from tqdm import tqdm

from pipeline.core.config import Config, save_config
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write
from pipeline.core.images import read_ahead, read_uint8
from pipeline.core.layout import DataLayout, OutputLayout, RunLayout
from pipeline.core.metrics import gain_text, paired_gain

if TYPE_CHECKING:  # torch, pandas and the inference package load in the functions that compute, after main's checks
    import pandas as pd

    from pipeline.inference.blend import FoldArrays, FoldStats
    from pipeline.inference.predict import Settings


def collect(cfg: Config, specs: list[str], models: list[list[Any]], settings: Settings) -> FoldStats:
    """Run every member on each validation image once and keep the image's statistics."""
    from pipeline.core.runtime import pick_device
    from pipeline.inference.blend import FoldStats, iter_members
    from pipeline.inference.predict import Timing

    pairs = DataLayout(Path(cfg.data.dir)).validation_pairs(cfg.data.val_fold)
    if len(pairs) < 2:
        raise UserError(f"data.val_fold={cfg.data.val_fold} holds {len(pairs)} image; a blend is judged by "
                        "cross-fitting, which needs at least 2")
    device = pick_device()
    timings = [Timing(device=str(device), precision="") for _ in models]
    stats = FoldStats(list(specs))
    lr_stream = read_ahead([(p.name, p.lr_path) for p in pairs])
    hr_stream = read_ahead([(p.name, p.hr_path) for p in pairs], read_uint8)
    predictions = iter_members(models, lr_stream, settings, device, timings, len(pairs))
    for (name, srs), (_name, hr) in tqdm(zip(predictions, hr_stream), total=len(pairs), desc="blend members",
                                         unit="img"):
        stats.add(name, srs, hr)
    return stats


def _gain(a: np.ndarray, b: np.ndarray, seed: int) -> dict[str, float]:
    mean, lo, hi = paired_gain(a, b, seed=seed)
    return {"mean": round(mean, 4), "lo": round(lo, 4), "hi": round(hi, 4)}


def report(stats: FoldArrays, cfg: Config) -> tuple[dict[str, Any], pd.DataFrame]:
    """blend.yaml's content and the per-image table, from the fold's statistics."""
    import pandas as pd

    from pipeline.inference.blend import METHODS, cross_fitted_psnr, fit
    from pipeline.inference.predict import Settings

    b = cfg.blend
    fits: dict[str, Any] = {}
    per_image = pd.DataFrame({"img_id": stats.names})
    for j, spec in enumerate(stats.members):
        per_image[spec] = stats.member_psnr[:, j]
    per_image["equal_mean"] = stats.mean_psnr
    for method in METHODS:
        w = fit(stats, method, b.greedy_rounds)
        cross, half_weights, half = cross_fitted_psnr(stats, method, b.greedy_rounds, cfg.seed)
        fits[method] = {"weights": [round(float(x), 6) for x in w],
                        "psnr_in_sample": round(float(stats.psnr(w).mean()), 4),
                        "psnr_cross_fitted": round(float(cross.mean()), 4),
                        "half_weights": [[round(float(x), 6) for x in hw] for hw in half_weights]}
        if method == "greedy":
            fits[method]["rounds"] = b.greedy_rounds
        per_image[f"{method}_in_sample"] = stats.psnr(w)
        per_image[f"{method}_cross_fitted"] = cross
        per_image["half"] = half
    weights = np.asarray(fits[b.method]["weights"])
    in_sample, cross = per_image[f"{b.method}_in_sample"].to_numpy(), per_image[f"{b.method}_cross_fitted"].to_numpy()
    member_means = stats.member_psnr.mean(axis=0)
    best = int(np.argmax(member_means))
    best_psnr = stats.member_psnr[:, best]
    content = {
        "name": b.name,
        "method": b.method,
        "members": list(stats.members),
        "weights": [float(x) for x in weights],
        "fits": fits,
        "settings": dataclasses.asdict(Settings.from_config(cfg.infer)),
        "validation": {
            "data": str(Path(cfg.data.dir).resolve()),
            "fold": cfg.data.val_fold,
            "images": stats.size,
            "split_seed": cfg.seed,
            "psnr": {
                "members": {s: round(float(v), 4) for s, v in zip(stats.members, member_means)},
                "equal_mean": round(float(stats.mean_psnr.mean()), 4),
                "blend_in_sample": round(float(in_sample.mean()), 4),
                "blend_cross_fitted": round(float(cross.mean()), 4),
            },
            "best_member": stats.members[best],
            "gain_cross_fitted": {"over_best_member": _gain(cross, best_psnr, cfg.seed),
                                  "over_equal_mean": _gain(cross, stats.mean_psnr, cfg.seed)},
            "gain_in_sample": {"over_best_member": _gain(in_sample, best_psnr, cfg.seed),
                               "over_equal_mean": _gain(in_sample, stats.mean_psnr, cfg.seed)},
            "note": "members and equal mean: the contest PSNR of the rounded images; a fitted blend's: its float "
                    "MSE plus the equal mean's rounding term per image (an estimate, ~0.001 dB on the mean; infer "
                    "blend.name=... infer.split=val scores it exactly); in_sample = fitted and scored "
                    "on the same images (optimistic), cross_fitted = each half scored with weights fitted on the "
                    "other; gains: mean per-image difference with a paired bootstrap 95% interval",
        },
    }
    return content, per_image


def print_report(content: dict[str, Any], per_image: pd.DataFrame, cfg: Config, out: OutputLayout) -> None:
    from pipeline.inference.blend import METHODS

    v = content["validation"]
    best = v["best_member"]
    rows = [(spec, per_image[spec]) for spec in content["members"]]
    rows.append(("equal mean", per_image["equal_mean"]))
    method = content["method"]
    rows.append((f"blend ({method}), in sample", per_image[f"{method}_in_sample"]))
    rows.append((f"blend ({method}), cross-fitted", per_image[f"{method}_cross_fitted"]))
    width = max(len(name) for name, _ in rows)
    print(f"blend {content['name']} on validation fold {v['fold']} ({v['images']} images); "
          f"gains over the best member, {best}:")
    for name, psnr in rows:
        gain = "" if name == best else gain_text(paired_gain(psnr, per_image[best], seed=cfg.seed))
        print(f"  {name:<{width}}  PSNR {psnr.mean():.4f}  {gain}")
    for m in METHODS:
        weights = ", ".join(f"{s} {w:.3f}" for s, w in zip(content["members"], content["fits"][m]["weights"]))
        mark = " (applied by infer)" if m == method else ""
        print(f"  weights {m}{mark}: {weights}")
    print(f"cross-fitted gain over the equal mean: "
          f"{gain_text(paired_gain(per_image[f'{method}_cross_fitted'], per_image['equal_mean'], seed=cfg.seed))}")
    print(f"blend: {out.blend_yaml}  per image: {out.blend_scores}")
    print(f"apply to the test set: python -m pipeline infer --data {cfg.data.dir} blend.name={content['name']}")


def main(cfg: Config) -> None:
    name = cfg.blend.name
    if not name:
        raise UserError("blend needs blend.name=NAME (outputs in submit/NAME/) and blend.members=[run_a,run_b,...]")
    out = OutputLayout(Path(cfg.paths.submit), name)
    if RunLayout(Path(cfg.paths.models), name).has_weights():
        raise UserError(f"blend.name={name} is a training run's name ({Path(cfg.paths.models) / name}); its "
                        "predictions would share submit/<name>/: choose another name")
    DataLayout(Path(cfg.data.dir)).need_splits()  # a wrong --data is reported before torch loads
    from pipeline.inference.blend import member_config, parse_members
    from pipeline.inference.predict import Settings, check_settings, load_models

    members = parse_members(cfg.blend.members)
    settings = Settings.from_config(cfg.infer)
    check_settings(settings)
    loaded = [load_models(member_config(cfg, m))[0] for m in members]  # every member found before any work
    stats = collect(cfg, [m.spec for m in members], loaded, settings).arrays()
    content, per_image = report(stats, cfg)
    with atomic_write(out.blend_scores) as tmp:
        per_image.to_csv(tmp, index=False, float_format="%.6f")
    save_config(cfg, out.blend_config, sections=("data", "infer", "blend", "paths"))
    with atomic_write(out.blend_yaml) as tmp:  # last: infer reads only a finished blend
        tmp.write_text(yaml.safe_dump(content, sort_keys=False))
    print_report(content, per_image, cfg, out)
