"""``demo-mri``: every volume stage on the scans bundled in dipy and nibabel, then a score table, a figure, a report.

In one process, in order: demo-mri-data (the folder of bundled scans), mri-prepare (folds by
subject, k-space LR), mri-train twice (L1 pre-training of ``<run>-l1``, then a WGAN-GP fine-tune
``<run>`` from its best.pth against ``demo_mri.critic``), mri-infer of the held-out volume by the
fine-tuned model, mri-evaluate (masked PSNR / SSIM / NRMSE; the trilinear / tricubic baselines as rows,
interpolated from the LR there), the orthogonal-slices figure (LR | ours | HR) and ``report.md`` in
``<demo_mri.out>/report``. Settings: ``configs/demo-mri.yaml`` unless ``--config`` names another
file (sized for minutes on a 2-core CPU); both training runs start fresh each time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import Config, with_overrides
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write
from pipeline.core.layout import RunLayout, VolumeLayout
from pipeline.core.steps import Steps
from pipeline.mri import demo_data, evaluate, infer, prepare, train
from pipeline.mri.figures import orthogonal_slices
from pipeline.mri.volumes import read_volume


def _report(path: Path, table: pd.DataFrame, figure: Path, cfg: Config, steps: Steps) -> None:
    rows = ["| method | item | PSNR (dB) | SSIM | NRMSE |", "|---|---|---:|---:|---:|"]
    rows += [f"| {r.method} | {r.item} | {r.psnr:.3f} | {r.ssim:.4f} | {r.nrmse:.4f} |" for r in table.itertuples()]
    t = cfg.train
    text = "\n".join([
        "# demo-mri", "",
        f"mDCSRN-style model `{cfg.mri_train.model}` trained on {cfg.mri_train.patch}^3 patches of the bundled scans "
        f"(k-space LR, held-out fold {cfg.mri.val_fold}): {cfg.demo_mri.pretrain_steps} L1 steps, then "
        f"{cfg.demo_mri.gan_steps} WGAN-GP steps against `{cfg.demo_mri.critic}` (batch {t.batch_size}).", "",
        "Masked (dilated Otsu foreground) scores on the held-out volume(s), real-world intensities:", "",
        *rows, "", f"![orthogonal slices: LR | ours | HR]({figure.name})", "",
        "| step | seconds |", "|---|---:|", *[f"| {name} | {s:.1f} |" for name, s in steps.times],
        f"| total | {steps.total():.1f} |", ""])
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def main(cfg: Config) -> None:
    steps = Steps()
    out = Path(cfg.demo_mri.out)
    steps.run("demo-mri-data", demo_data.main, cfg)
    record = demo_data.ensure_demo_mri(out, cfg)  # (the folder just built or checked)
    # Fresh runs each time: the table describes this invocation's training.
    cfg = with_overrides(cfg, **demo_data.demo_settings(out, record),
                         **{"mri_train.patch": record["patch"], "train.resume": "never"})
    d = cfg.demo_mri
    pretrain_run = f"{cfg.run}-l1"
    models = RunLayout(Path(cfg.paths.models), pretrain_run)
    l1 = with_overrides(cfg, **{"run": pretrain_run, "train.max_steps": d.pretrain_steps, "gan.discriminator": ""})
    gan = with_overrides(cfg, **{"train.max_steps": d.gan_steps, "train.learning_rate": d.gan_learning_rate,
                                 "train.warmup_steps": 0, "model.pretrained": str(models.best),
                                 "gan.discriminator": d.critic, "gan.loss": "wgan-gp"})

    steps.run("mri-prepare", prepare.main, cfg)
    steps.run(f"mri-train {cfg.mri_train.model}: L1, {d.pretrain_steps} steps", train.main, l1)
    steps.run(f"mri-train: WGAN-GP, {d.gan_steps} steps from {models.best}", train.main, gan)
    steps.run("mri-infer: ours", infer.main, cfg)
    steps.run("mri-evaluate", evaluate.main, cfg)

    layout = VolumeLayout(out)
    table = pd.read_csv(layout.scores_csv(cfg.run))
    report_dir = layout.report_dir(cfg.run)
    item = str(table["item"].iloc[0])
    hr_path = out / f"{item}.nii.gz"
    hr = read_volume(hr_path)
    panels = {"LR": read_volume(layout.lr_dir / hr_path.name).data, "ours": read_volume(
        layout.sr_dir(cfg.run) / hr_path.name).data, "HR": hr.data}
    zooms = np.sqrt((hr.affine[:3, :3] ** 2).sum(axis=0))  # voxel size per axis (mm)
    figure = orthogonal_slices(report_dir / "slices.png", panels, zooms, title=f"{item}: LR | ours | HR")
    means = table[table["item"] == "mean"].set_index("method")
    _report(report_dir / "report.md", table, figure, cfg, steps)

    print("\n== steps ==")
    print("\n".join(f"  {t:7.1f} s  {name}" for name, t in steps.times))
    print(f"  {steps.total():7.1f} s  total")
    print(f"report: {report_dir / 'report.md'}  figure: {figure}")
    ours, base = means.loc[cfg.run], means.loc["tricubic"]
    if not np.isfinite(means["psnr"]).all():
        raise UserError("demo-mri produced a non-finite PSNR")
    print(f"demo-mri: ours PSNR {ours.psnr:.3f} dB / SSIM {ours.ssim:.4f} vs tricubic {base.psnr:.3f} dB / "
          f"{base.ssim:.4f} ({ours.psnr - base.psnr:+.3f} dB) on {int((table['item'] != 'mean').sum() / len(means))} "
          f"held-out volume(s) in {steps.total():.0f} s")
