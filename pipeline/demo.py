"""``demo``: every stage on the bundled-photo dataset, then the score table, ablation and report.

It runs, in order and in one process: demo-data, prepare, patchify, train (``demo.train_minutes``
of a tiny model), infer on the test set (bicubic, the model alone, the model with the 8-way
ensemble, all through 49 overlapping tiles per image), submit, infer on the validation fold (a
leaderboard row), ablate (a small grid) and a report image. Settings come from
``configs/demo.yaml`` unless ``--config`` names another file; ``key=value`` overrides apply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import ablate, demo_data, infer, patchify, prepare, submit, train
from pipeline.core.config import Config, with_overrides
from pipeline.core.files import atomic_write
from pipeline.core.images import read_uint8
from pipeline.core.layout import OutputLayout, RunLayout
from pipeline.core.steps import Steps
from pipeline.evaluate import evaluate_folders


def score_table(rows: list[tuple[str, Path]], hr_dir: Path) -> pd.DataFrame:
    """Mean PSNR / SSIM per prediction folder on the held-out test images, and the gain over bicubic."""
    table = pd.DataFrame([
        {"method": name, **evaluate_folders(folder, hr_dir)[["psnr", "ssim"]].mean().to_dict()}
        for name, folder in rows])
    table["gain_db"] = table["psnr"] - table["psnr"].iloc[0]
    return table


def report(pred_dirs: dict[str, Path], hr_dir: Path, out: Path, crop: int = 128) -> Path:
    """Side-by-side centre crops per test image: bicubic | ours | HR, with per-image PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.core.metrics import score_pair

    names = sorted(p.stem for p in hr_dir.glob("*.png"))
    cols = [*pred_dirs, "HR"]
    fig, axes = plt.subplots(len(names), len(cols), figsize=(3.2 * len(cols), 3.3 * len(names)), dpi=100,
                             squeeze=False)
    for r, name in enumerate(names):
        hr = read_uint8(hr_dir / f"{name}.png")
        y, x = (hr.shape[0] - crop) // 2, (hr.shape[1] - crop) // 2
        for c, col in enumerate(cols):
            img = hr if col == "HR" else read_uint8(pred_dirs[col] / f"{name}.png")
            title = f"{name} HR" if col == "HR" else f"{col}: {score_pair(img, hr)['psnr']:.2f} dB"
            axes[r, c].imshow(img[y : y + crop, x : x + crop], interpolation="nearest")
            axes[r, c].set_title(title, fontsize=9)
            axes[r, c].axis("off")
    fig.tight_layout()
    with atomic_write(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def main(cfg: Config) -> None:
    steps = Steps()
    root = Path(cfg.demo.out)
    # A fresh run each time: the score table describes this invocation's training.
    cfg = with_overrides(cfg, **{"data.dir": str(root), "train.max_minutes": cfg.demo.train_minutes,
                                 "train.resume": "never"})
    out = OutputLayout(Path(cfg.paths.submit), cfg.run)
    sub = out.dir
    test_lr, test_hr = root / "test" / "lr", root / "test_hr"

    steps.run("demo-data", demo_data.main, cfg)
    steps.run("prepare", prepare.main, cfg)
    steps.run("patchify", patchify.main, cfg)
    steps.run(f"train {cfg.model.name} for {cfg.demo.train_minutes:g} min", train.main, cfg)

    pred = {"bicubic": sub / "bicubic", f"{cfg.model.name}": sub / "pred_tta1",
            f"{cfg.model.name} + {cfg.infer.tta}-way ensemble": out.pred}
    steps.run("infer: bicubic", infer.main, with_overrides(
        cfg, **{"model.name": "bicubic", "infer.input": str(test_lr), "infer.output": str(pred["bicubic"])}))
    steps.run("infer: model alone", infer.main, with_overrides(
        cfg, **{"infer.tta": 1, "infer.input": str(test_lr), "infer.output": str(sub / "pred_tta1")}))
    steps.run("infer: model + ensemble (test set)", infer.main, cfg)
    steps.run("submit", submit.main, cfg)
    steps.run("infer: validation fold -> leaderboard", infer.main, with_overrides(cfg, **{"infer.split": "val"}))
    steps.run("ablate", ablate.main, cfg)
    report_png = report({"bicubic": pred["bicubic"], "ours": out.pred}, test_hr, out.report)

    table = score_table(list(pred.items()), test_hr)
    n_test = len(list(test_hr.glob("*.png")))
    print(f"\n== scores on the {n_test} held-out test images (PSNR on RGB, as the contest) ==")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    abl = pd.read_csv(out.ablation_csv).sort_values("psnr", ascending=False)
    print(f"\n== ablation on validation fold {cfg.data.val_fold} ==")
    print(abl.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\n== steps ==")
    print("\n".join(f"  {t:7.1f} s  {name}" for name, t in steps.times))
    print(f"  {steps.total():7.1f} s  total")
    print(f"\nsubmission: {out.submission('zip')}")
    print(f"report:     {report_png}  (crops bicubic | ours | HR)")
    print(f"curves:     {RunLayout(Path(cfg.paths.models), cfg.run).curves}")
    print(f"ablation:   {out.ablation_png}")
    print(f"leaderboard: {out.leaderboard}")
    if not np.isfinite(table["psnr"]).all():
        raise RuntimeError("demo produced a non-finite PSNR")
