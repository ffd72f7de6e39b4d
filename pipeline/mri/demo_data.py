"""``demo-mri-data``: a volume folder built from the MRI scans bundled in installed packages (nothing downloaded).

Every bundled scan (``bundled.BUNDLED_SCANS``) is one subject, so the folds split by scan:

    <out>/dwib0_0.nii.gz  brain_0.nii.gz  epi_0.nii.gz epi_1.nii.gz  t1_0.nii.gz   HR volumes
    <out>/mri_splits.csv  lr/ (degradation.yaml)                                 as mri-prepare makes them
    <out>/demo.json       seed, recipe version, the held-out fold, the scaled-down geometry

HR volumes are the scans as 3-D NIfTI in their stored dtype and header (``volumes.read_volume`` +
``write_volume``: a 4-D scan gives one file per volume, both of its subject; big-endian data is
written native). Folds: one subject per fold; the validation fold is the one holding ``HELD_OUT``
(dipy's whole-brain ``aniso_vox``), recorded in ``demo.json`` because the seeded fold assignment
decides its number. LR volumes: the ``mri`` defaults (k-space, a quarter of the spectrum kept,
the slice axis whole: the scans have 10-25 slices).

Geometry scaled down to fit the small scans, as the 2-D demo divides the contest's by 4: 3-D
patches of ``PATCH`` = 64 / 4 = 16 voxels (mDCSRN's 64^3), slices of ``SLICE_HR`` = 32 / ``SLICE_LR``
= 8 pixels (SRResCycGAN's 320 / 80 divided by 10: the smallest scan is 33 x 41 in-plane).
``demo_overrides`` gives the settings later stages run the demo folder with.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.config import Config, with_overrides
from pipeline.core.files import atomic_write, staged_dir
from pipeline.core.layout import VolumeLayout
from pipeline.mri.bundled import BUNDLED_SCANS, bundled_scan
from pipeline.mri.lrset import write_lr_folder
from pipeline.mri.splits import build_splits, write_splits
from pipeline.mri.volumes import read_volume, volume_shape, write_volume

VERSION = 1  # bump when the recipe changes, so an old demo folder is rebuilt
MARK = "demo.json"
SUBJECTS = {  # bundled file name -> subject id
    "S0_10slices.nii.gz": "dwib0",
    "aniso_vox.nii.gz": "brain",
    "example4d.nii.gz": "epi",
    "anatomical.nii": "t1",
}
HELD_OUT = "brain"
PATCH = 64 // 4  # mDCSRN's 64^3 patches, / 4 like the 2-D demo's geometry
SLICE_HR, SLICE_LR = 320 // 10, 80 // 10  # SRResCycGAN's fastMRI slices, / 10 to fit a 33 x 41 scan


def _write_hr(out: Path) -> None:
    """One 3-D NIfTI per scan volume, named ``<subject>_<k>.nii.gz``."""
    for package, rel in BUNDLED_SCANS:
        path = bundled_scan(package, rel)
        subject = SUBJECTS[path.name]
        _shape, count = volume_shape(path)
        for k in range(count):
            hr = read_volume(path, k)
            write_volume(out / f"{subject}_{k}.nii.gz", hr.data, hr)


def build(out: Path, cfg: Config, final: Path | None = None) -> dict:
    """Write the demo folder into ``out`` (empty; ``final``: where it will live); returns what demo.json records."""
    _write_hr(out)
    folds = len(SUBJECTS)
    cfg = with_overrides(cfg, **{"mri.dir": str(final or out), "mri.folds": folds, "mri.volume4d": "first"})
    table = build_splits(out, folds, cfg.seed, cfg.mri.subject_pattern, cfg.mri.volume4d)
    write_splits(out, table)
    val_fold = int(table.loc[table["subject"] == HELD_OUT, "fold"].iloc[0])
    write_lr_folder(out, table, with_overrides(cfg, **{"mri.val_fold": val_fold}))
    return {"seed": cfg.seed, "version": VERSION, "folds": folds, "val_fold": val_fold, "held_out": HELD_OUT,
            "patch": PATCH, "slice_hr": SLICE_HR, "slice_lr": SLICE_LR}


def ensure_demo_mri(out: str | Path, cfg: Config) -> dict:
    """Build the demo folder at ``out`` unless one with this seed and recipe is there; its demo.json."""
    out = Path(out)
    mark = out / MARK
    if mark.is_file():
        try:
            record = json.loads(mark.read_text())
            if record.get("seed") == cfg.seed and record.get("version") == VERSION:
                return record
        except json.JSONDecodeError:
            pass
    with staged_dir(out, MARK) as stage:  # refuses a folder it did not write; swapped in whole
        record = build(stage, cfg, out)
        with atomic_write(stage / MARK) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
    return record


def demo_settings(out: str | Path, record: dict) -> dict[str, object]:
    """The settings that run the stages on the demo folder (its folds and held-out fold), for ``with_overrides``."""
    return {"mri.dir": str(out), "mri.folds": record["folds"], "mri.val_fold": record["val_fold"]}


def demo_overrides(out: str | Path, record: dict) -> list[str]:
    """``demo_settings`` as ``key=value`` command-line settings."""
    return [f"{key}={value}" for key, value in demo_settings(out, record).items()]


def main(cfg: Config) -> None:
    out = Path(cfg.demo_mri.out)
    record = ensure_demo_mri(out, cfg)
    layout = VolumeLayout(out)
    items = len(list(layout.lr_dir.glob("*.nii.gz")))
    print(f"demo volumes: {out} ({items} items of {record['folds']} subjects, held out: {record['held_out']} "
          f"in fold {record['val_fold']}; patches {record['patch']}^3, slices {record['slice_hr']} / "
          f"{record['slice_lr']})")
    print("settings for the other stages: " + " ".join(demo_overrides(out, record)))
